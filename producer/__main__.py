"""``python -m producer``: run the IB -> Redis Stream producer."""

# Before the heavy imports: a SIGTERM during them must stop the producer cleanly.
from infra.stopping import install_early

install_early()

from producer.cli import main  # noqa: E402

raise SystemExit(main())
