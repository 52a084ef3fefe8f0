from gateway_sim.simulator import main

raise SystemExit(main())
