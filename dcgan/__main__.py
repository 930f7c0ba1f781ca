from dcgan.cli import main

raise SystemExit(main())
