from dcgan.cli.main import main

raise SystemExit(main())
