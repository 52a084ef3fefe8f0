"""Names that live in the lake: every table's folder under ``POSLAKE_LAKE_URI``.

Declared here once; the entry kinds (shared/kinds.py) and the settings' URIs use them.
"""

from __future__ import annotations

POSITION_UPDATES = "position_updates"
POSITIONS_CURRENT = "positions_current"
EXECUTIONS = "executions"
ACCOUNT_VALUES = "account_values"
ACCOUNT_VALUES_CURRENT = "account_values_current"
OPTION_GREEKS = "option_greeks"
OPTION_GREEKS_CURRENT = "option_greeks_current"
POSITION_SNAPSHOTS = "position_snapshots"
ACCOUNT_SNAPSHOTS = "account_snapshots"

# Objects poslake itself keeps beside the tables (the store check's probe).
PROBE_PREFIX = "_poslake"
