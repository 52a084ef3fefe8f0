"""The contract between producers and consumers, and nothing else: the models
(``model``, ``executions``, ``account_values``), the wire format (``wire``), the
entry kinds and their tables (``kinds``, ``table``, ``lake_names``), the
settings and the errors. The plumbing both sides use lives in ``infra/``."""
