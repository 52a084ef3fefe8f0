"""``python -m consumer``: run one consumer process."""

from consumer.cli import main

raise SystemExit(main())
