"""``python -m producer``: run the IB -> Redis Stream producer."""

import sys

# The IB side (ib_async client, gateway simulator) is the producer issue's work;
# until it lands this entry point says so plainly instead of pretending.
print(
    "poslake producer: the IB producer is not built yet; publish with "
    "shared.publisher.StreamPublisher or see README 'Wire format'",
    file=sys.stderr,
)
raise SystemExit(2)
