"""The options data model: strategy positions, legs, Greeks snapshots and
transactions (``tables``), and the repositories applications use to read and
write them (``repository``)."""
