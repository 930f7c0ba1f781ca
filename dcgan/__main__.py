"""`python -m dcgan`: the `dcgan` command, as torchrun starts it (`torchrun --nproc_per_node=8 -m dcgan train CONFIG`)."""

from dcgan.cli.main import main

raise SystemExit(main())
