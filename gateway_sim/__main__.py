from gateway_sim.cli import main

raise SystemExit(main())
