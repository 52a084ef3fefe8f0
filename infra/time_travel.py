"""Opening a Delta table now, at a version or as of a time: the one helper the CLI and
the repositories share, so both say the same thing about a version or time the table
does not have."""

from __future__ import annotations

from datetime import UTC, datetime

from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from shared.errors import RepositoryError, TableMissing

RETENTION_HINT = "POSLAKE_HISTORY_RETENTION_HOURS"


def open_table_at(
    uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    version: int | None = None,
    at: datetime | None = None,
    shown: str | None = None,
) -> DeltaTable:
    """The table at ``uri``, at its latest version, at ``version``, or as of ``at`` (a
    naive time is UTC). Raises :class:`TableMissing` when there is no table and
    :class:`RepositoryError` for a version or time it does not have (never before it
    existed, never older than the history kept). ``shown`` names it in messages."""
    name = shown or uri
    try:
        table = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        raise TableMissing(f"no table at {name}") from None
    if version is not None:
        latest = table.version()
        if not 0 <= version <= latest:
            raise RepositoryError(f"version {version} does not exist (latest is {latest})")
        try:
            table.load_as_version(version)
        except (TableNotFoundError, DeltaError):
            raise RepositoryError(
                f"version {version} is older than the history kept for time travel "
                f"({RETENTION_HINT})"
            ) from None
    elif at is not None:
        moment = at if at.tzinfo else at.replace(tzinfo=UTC)
        # A time before the oldest kept commit loads that commit: compare with it.
        # Commit times from the latest snapshot: the history of a table loaded at an
        # older version is reported against the wrong version numbers (delta-rs 1.x).
        stamps = {int(h["version"]): int(h["timestamp"]) for h in table.history()}
        table.load_as_version(moment)
        loaded = {"version": table.version(), "timestamp": stamps.get(table.version(), 0)}
        committed = datetime.fromtimestamp(int(loaded["timestamp"]) / 1000, UTC)
        if moment < committed:
            if int(loaded["version"]) == 0:
                reason = f"is before the table existed (created {committed.isoformat()})"
            else:
                reason = (
                    f"is older than the history kept for time travel (oldest version "
                    f"{loaded['version']}, {committed.isoformat()}; {RETENTION_HINT})"
                )
            raise RepositoryError(f"{moment.isoformat()} {reason}")
    return table
