"""``poslake maintain``: vacuum, compact, checkpoint every kind's tables.

Consumers do all of this themselves as they go; this is the operator's full
pass: vacuum files that no version within the retention needs (and orphans,
consumer/vacuum.py), compact every partition to the target file size, write a
checkpoint.
Vacuuming with a retention shorter than ``POSLAKE_HISTORY_RETENTION_HOURS``
would break time travel to versions inside that history, so it is refused
unless ``--force``. It also sets each table's tombstone retention
and log retention (``delta.deletedFileRetentionDuration``,
``delta.logRetentionDuration``) to that history and a margin, if the setting
changed since the table was created. Running it while consumers commit is safe:
compaction only rewrites files, and a concurrent append conflicts with nothing
it removes (a property change makes in-flight appends retry once).
"""

from __future__ import annotations

import argparse
import math

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from consumer.store_check import check_put_if_absent
from consumer.vacuum import sweep_orphans
from poslake.command import CommandError, ExitCode
from poslake.query import open_table
from shared.errors import ConfigError
from shared.kinds import POSITIONS, all_tables
from shared.settings import Settings
from shared.table import LOG_RETENTION, TOMBSTONE_RETENTION, retention_interval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-compact", action="store_true")
    parser.add_argument("--skip-checkpoint", action="store_true")
    parser.add_argument("--skip-vacuum", action="store_true")
    parser.add_argument(
        "--retention-hours",
        type=float,
        help="vacuum files older than this (default POSLAKE_HISTORY_RETENTION_HOURS)",
    )
    parser.add_argument(
        "--force", action="store_true", help="allow a retention shorter than the configured history"
    )
    parser.add_argument("--dry-run", action="store_true", help="vacuum: only list what would go")


def run(args: argparse.Namespace, settings: Settings) -> int:
    history = settings.history_retention_hours
    retention = history if args.retention_hours is None else args.retention_hours
    if retention < 0:
        raise CommandError("--retention-hours must not be negative", ExitCode.BAD_INPUT)
    if retention < history and not args.force:
        raise CommandError(
            f"a {retention:g} h retention would break time travel within the configured "
            f"{history:g} h history (POSLAKE_HISTORY_RETENTION_HOURS); use --force to do it anyway",
            ExitCode.BAD_INPUT,
        )
    if not args.dry_run:
        # Compactions are commits too: on a store that ignores put-if-absent they could
        # overwrite a consumer's commit (consumer/store_check.py).
        try:
            check_put_if_absent(settings.lake_uri, settings.storage_options)
        except ConfigError as exc:
            raise CommandError(str(exc), ExitCode.BAD_INPUT) from None
    # The positions' history must exist (else "not found"); any other table may not yet.
    tables = [(POSITIONS.table, open_table(settings))]
    for name in all_tables():
        if name == POSITIONS.table:
            continue
        uri = settings.lake_table_uri(name)
        try:
            tables.append((name, DeltaTable(uri, storage_options=settings.storage_options or None)))
        except TableNotFoundError:
            continue
    wanted = retention_interval(history)
    for name, each in tables:
        configuration = each.metadata().configuration
        stale = {
            key: wanted
            for key in (TOMBSTONE_RETENTION, LOG_RETENTION)
            if configuration.get(key) != wanted
        }
        if stale:
            # POSLAKE_HISTORY_RETENTION_HOURS changed since the table was created.
            if not args.dry_run:
                each.alter.set_table_properties(stale)
            verb = "would set" if args.dry_run else "set"
            print(f"{name}: {verb} {', '.join(stale)} to '{wanted}'")
        # Vacuum before the checkpoint below: a checkpoint drops expired tombstones.
        if not args.skip_vacuum:
            removed = each.vacuum(
                retention_hours=math.ceil(retention),
                dry_run=args.dry_run,
                enforce_retention_duration=False,
            )
            verb = "would remove" if args.dry_run else "removed"
            print(f"{name}: vacuum ({retention:g} h retention) {verb} {len(removed)} files")
            if not args.dry_run:
                swept = sweep_orphans(each, settings.storage_options)
                print(f"{name}: removed {len(swept)} orphaned files (in no kept version)")
        if not args.skip_compact:
            metrics = each.optimize.compact(target_size=settings.compact_target_file_bytes)
            print(
                f"{name}: compacted {metrics.get('numFilesRemoved', 0)} files into "
                f"{metrics.get('numFilesAdded', 0)}"
            )
        if not args.skip_checkpoint:
            each.create_checkpoint()
            print(f"{name}: checkpoint written at version {each.version()}")
            if not args.dry_run:
                each.cleanup_metadata()
    return ExitCode.OK
