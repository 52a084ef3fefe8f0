"""``python -m producer``: run the IB -> Redis Stream producer."""

from producer.cli import main

raise SystemExit(main())
