"""``python -m consumer``: run one consumer process."""

# Before the heavy imports: a SIGTERM during them must stop the consumer cleanly.
from infra.stopping import install_early

install_early()

from consumer.cli import main  # noqa: E402

raise SystemExit(main())
