from poslake.cli import main

raise SystemExit(main())
