"""The Delta sink in-process against real tables: races, cold dedup, maintenance."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

import msgspec
import pyarrow as pa
import pytest
import redis
from deltalake import DeltaTable

from consumer.current import CurrentWriter
from consumer.dedup import BatchKeys, CommittedKeyIndex
from consumer.maintenance import TableMaintainer
from consumer.sink import DeltaSink
from consumer.vacuum import history_hours, interval_seconds, sweep_orphans, vacuum_retired
from shared.errors import CommitConflict
from shared.model import PositionUpdate
from shared.settings import TOMBSTONE_MARGIN_HOURS, Settings
from shared.table import partitions_to_compact, updates_to_arrow
from tests.helpers import assert_current_exact, assert_table_exact, make_updates


def _settings(lake: Path, name: str = "c1", **extra: object) -> Settings:
    return Settings(lake_uri=str(lake), consumer_name=name, **extra)  # type: ignore[arg-type]


def _ids(n: int, offset: int = 0) -> list[bytes]:
    return [f"{1_700_000_000_000 + offset + i}-0".encode() for i in range(n)]


def test_two_consumers_holding_the_same_keys_write_them_once(lake: Path) -> None:
    updates = make_updates(500, seed=31)
    first, second = DeltaSink(_settings(lake, "a")), DeltaSink(_settings(lake, "b"))
    first.commit(updates[:100], _ids(100))

    # b has checked its batch against the table; a commits the same keys before b writes.
    second.before_write = lambda: first.commit(updates[100:], _ids(400, 100))
    with pytest.raises(CommitConflict):
        second.commit(updates[100:], _ids(400, 100))
    second.before_write = None
    outcome = second.commit(updates[100:], _ids(400, 100))  # the retry sees a's rows
    assert outcome.rows_written == 0 and outcome.duplicates == 400
    assert_table_exact(lake, updates)


def test_other_consumers_commits_are_learned_without_reading_the_table(lake: Path) -> None:
    updates = make_updates(900, seed=32)
    a, b = DeltaSink(_settings(lake, "a")), DeltaSink(_settings(lake, "b"))
    for i in range(3):
        part = updates[i * 300 : (i + 1) * 300]
        (a if i % 2 == 0 else b).commit(part, _ids(300, i * 300))
    # b learned a's rows from the change feed of a's commits: all of them are known.
    b.table.update_incremental()
    b.index.sync(b.table, set())
    assert all(u.key in b.index for u in updates)
    assert b.commit(updates, _ids(900)).rows_written == 0
    assert_table_exact(lake, updates)


def test_keys_older_than_the_horizon_are_checked_against_the_table(lake: Path) -> None:
    old = make_updates(400, seed=33)
    DeltaSink(_settings(lake)).commit(old, _ids(400))
    fresh_process = DeltaSink(_settings(lake))  # index empty, horizon past every old key
    assert len(fresh_process.index) == 0
    newer = make_updates(100, seed=34, start=old[-1].timestamp)[1:]
    outcome = fresh_process.commit(old[::2] + newer, _ids(200 + len(newer)))
    assert outcome.rows_written == len(newer) and outcome.duplicates == 200
    assert_table_exact(lake, old + newer)


def test_index_bound_moves_the_horizon_and_stays_correct(lake: Path) -> None:
    updates = make_updates(6_000, seed=35)
    sink = DeltaSink(_settings(lake, dedup_index_max_keys=1_000))
    for i in range(0, 6_000, 500):
        sink.commit(updates[i : i + 500], _ids(500, i))
    assert len(sink.index) <= 1_000
    assert sink.index.horizon_us > 0
    # Replays from before the horizon go to the table; none is written twice.
    outcome = sink.commit(updates[::7], _ids(len(updates[::7])))
    assert outcome.rows_written == 0
    assert_table_exact(lake, updates)


def test_index_never_answers_for_keys_below_its_horizon() -> None:
    below, at = make_updates(2, seed=37)
    index = CommittedKeyIndex(max_keys=1_000)
    index.horizon_us = at.key[2]
    rows = updates_to_arrow([below, at], _ids(2))
    index.add_committed(index.keys_for(rows), [0, 1])
    assert below.key not in index and at.key in index


@pytest.mark.parametrize(
    "stamps",
    [
        [1_000 + i for i in range(3_000)],  # one add three times the bound
        [7] * 1_001 + [9, 9, 12],  # most keys share one timestamp
        [5] * 400 + [6] * 400 + [8] * 400,
    ],
)
def test_index_bound_keeps_every_key_at_or_after_the_horizon(stamps: list[int]) -> None:
    index = CommittedKeyIndex(max_keys=1_000)
    batch = BatchKeys(list(range(len(stamps))), stamps)
    index.add_committed(batch, range(len(stamps)))
    assert index.horizon_us > 0 and len(index) <= 1_000
    kept = [(c, t) for c, t in zip(batch.contracts, stamps, strict=True) if t >= index.horizon_us]
    assert len(kept) == len(index)
    # Every key at or after the horizon is answered from memory as already committed.
    known = BatchKeys([c for c, _ in kept], [t for _, t in kept])
    assert index.split_new(known, pa.table({}), None) == []  # type: ignore[arg-type]


def test_index_bound_keeps_exactly_the_newest_half() -> None:
    # Distinct stamps spread over contracts out of order: the horizon found by the
    # search over time is the (bound/2 + 1)-th newest stamp, no more and no less.
    stamps = [(i * 7_919) % 10_007 + 50 for i in range(1_001)]
    index = CommittedKeyIndex(max_keys=1_000)
    index.add_committed(BatchKeys([i % 13 for i in range(1_001)], stamps), range(1_001))
    newest = sorted(stamps, reverse=True)
    assert index.horizon_us == newest[500] and len(index) == 501


def test_maintenance_compacts_small_files_and_keeps_every_row(lake: Path) -> None:
    settings = _settings(lake, compact_min_small_files=5, checkpoint_interval=10)
    sink = DeltaSink(settings)
    updates = make_updates(4_000, seed=36)
    for i in range(0, 4_000, 100):
        sink.commit(updates[i : i + 100], _ids(100, i))
    table = DeltaTable(settings.table_uri)
    # 40 commits at checkpoint_interval 10, yet the consumer's commits wrote no checkpoint:
    # the maintenance run writes one after compacting.
    log_dir = Path(settings.table_uri) / "_delta_log"
    assert table.version() == 40 and not list(log_dir.glob("*.checkpoint.parquet"))
    files_before = len(table.file_uris())
    assert partitions_to_compact(table, settings.compact_small_file_bytes, 5)
    compacted = TableMaintainer(settings, client=None).run_once()  # type: ignore[arg-type]
    assert compacted
    table = DeltaTable(settings.table_uri)
    per_partition = (
        pa.table(table.get_add_actions(flatten=True)).column("partition.symbol").to_pylist()
    )
    assert all(per_partition.count(symbol) == 1 for symbol in compacted)
    assert len(per_partition) < files_before
    table.update_incremental()
    checkpoint = (
        Path(settings.table_uri) / "_delta_log" / f"{table.version():020d}.checkpoint.parquet"
    )
    assert checkpoint.exists()
    # Appends after compaction still dedup and land once.
    sink.commit(updates[::3], _ids(len(updates[::3])))
    assert_table_exact(lake, updates)
    rows = pa.table(table.get_add_actions(flatten=True)).column("num_records").to_pylist()
    assert sum(rows) == 4_000


def _live_files(table: DeltaTable) -> set[str]:
    # The log holds paths URL-encoded; on disk they are decoded once.
    return {unquote(p) for p in pa.table(table.get_add_actions()).column("path").to_pylist()}


def _data_files(uri: str) -> set[str]:
    root = Path(uri)
    return {
        str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts
    }


def _filled_lake(lake: Path, history: float = 24.0) -> tuple[Settings, list[PositionUpdate]]:
    """Both tables after 20 commits and a compaction: retired files in both."""
    settings = _settings(lake, compact_min_small_files=5, history_retention_hours=history)
    sink = DeltaSink(settings)
    current = CurrentWriter(settings)
    updates = make_updates(2_000, seed=38)
    # Partition folders whose names need encoding (delta-rs writes "symbol=BRK%20B").
    updates = [
        msgspec.structs.replace(u, symbol=("BRK B", "R#S")[u.conid % 2]) if u.conid % 5 < 2 else u
        for u in updates
    ]
    for i in range(0, 2_000, 100):
        part, ids = updates[i : i + 100], _ids(100, i)
        sink.commit(part, ids)
        current.merge(updates_to_arrow(part, ids))
    assert TableMaintainer(settings, client=None).run_once()  # type: ignore[arg-type]
    for uri in (settings.table_uri, settings.current_table_uri):  # both checkpointed
        version = DeltaTable(uri).version()
        assert (Path(uri) / "_delta_log" / f"{version:020d}.checkpoint.parquet").exists()
    return settings, updates


def _age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def test_vacuum_deletes_retired_files_of_both_tables_and_nothing_live(lake: Path) -> None:
    settings, updates = _filled_lake(lake)
    uris = (settings.table_uri, settings.current_table_uri)
    live = {uri: _live_files(DeltaTable(uri)) for uri in uris}
    for uri in uris:
        assert _data_files(uri) > live[uri]  # retired files still on disk: the history needs them
    # Within the history window nothing goes.
    assert TableMaintainer(settings, client=None).vacuum()  # type: ignore[arg-type]
    for uri in uris:
        assert _data_files(uri) > live[uri]
    assert DeltaTable(settings.table_uri, version=3).to_pyarrow_table().num_rows == 300
    # Past it, every retired file goes and every live one stays.
    for uri in uris:
        assert vacuum_retired(DeltaTable(uri), history=0)
        assert _data_files(uri) == live[uri]
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)


def test_orphan_sweep_deletes_only_old_files_no_kept_version_knows(lake: Path) -> None:
    settings, updates = _filled_lake(lake)
    root = Path(settings.table_uri)
    table = DeltaTable(settings.table_uri)
    live = _live_files(table)
    retired = sorted(_data_files(settings.table_uri) - live)
    some_live = root / sorted(live)[0]
    orphan = some_live.with_name("part-99999-orphan-c000.zstd.parquet")  # a failed write's file
    young = some_live.with_name("part-99998-being-committed-c000.zstd.parquet")
    shutil.copy(some_live, orphan)
    shutil.copy(some_live, young)
    for path in root.rglob("*.parquet"):  # every data file old: only age protects `young`
        _age(path, hours=2)
    _age(young, hours=0)
    assert any("%" in name for name in retired)  # retired files in encoded folders too
    swept = sweep_orphans(table)
    assert swept == [orphan.relative_to(root).as_posix()]
    assert not orphan.exists() and young.exists()
    assert some_live.exists() and (root / retired[0]).exists()  # live; retired in the window
    assert DeltaTable(settings.table_uri, version=3).to_pyarrow_table().num_rows == 300
    assert_table_exact(lake, updates)


def test_vacuum_keeps_the_longer_of_the_setting_and_the_tables_history(lake: Path) -> None:
    settings, _ = _filled_lake(lake, history=10)
    table = DeltaTable(settings.table_uri)
    assert history_hours(table, 5) == 10  # raised on the table, this process not told yet
    assert history_hours(table, 30) == 30
    assert interval_seconds("interval 1 week") == 604_800
    assert interval_seconds("interval 90 minutes") == 5_400
    assert interval_seconds("1 week") is None


def test_maintainer_vacuums_on_the_clock_under_the_lease(lake: Path, redis_url: str) -> None:
    settings, _ = _filled_lake(lake)
    client = redis.Redis.from_url(redis_url)
    root = Path(settings.current_table_uri)
    stray = root / "symbol=AAPL" / "part-99999-orphan-c000.zstd.parquet"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not even parquet")
    _age(stray, hours=2)
    maintainer = TableMaintainer(settings, client)
    maintainer.poll()  # due at start: no commit needed
    maintainer.wait()
    assert not stray.exists()
    stray.write_bytes(b"again")
    _age(stray, hours=2)
    maintainer.poll()  # not due again for vacuum_interval_s
    maintainer.wait()
    assert stray.exists()
    # Another consumer holding the lease: this one skips, and tries again within a minute.
    key = settings.maintenance_lease_key
    client.set(key, "someone-else", px=60_000)
    waiting = TableMaintainer(settings, client)
    waiting.poll()
    waiting.wait()
    assert stray.exists()
    client.delete(key)


def test_tables_keep_tombstones_and_logs_for_the_history_and_a_margin(lake: Path) -> None:
    settings = _settings(lake, history_retention_hours=10)
    DeltaSink(settings)
    CurrentWriter(settings)
    for uri in (settings.table_uri, settings.current_table_uri):
        configuration = DeltaTable(uri).metadata().configuration
        expected = f"interval {(10 + TOMBSTONE_MARGIN_HOURS) * 3600} seconds"
        assert configuration["delta.deletedFileRetentionDuration"] == expected
        assert configuration["delta.logRetentionDuration"] == expected
