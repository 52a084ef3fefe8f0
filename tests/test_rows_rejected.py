"""A commit that fails because of the rows it carries: the culprits are found by
bisection and dead-lettered, the rest lands once; environmental failures are not
mistaken for it.

The data-caused failure is real: the lake lives at a path so long that a partition
folder for a 64-byte symbol (legal on the wire: 32 two-byte characters, each byte
percent-encoded to 3) pushes a data file's path over the 4,096-byte PATH_MAX, while
short symbols still fit. The file system answers ENAMETOOLONG, as it does for any
partition folder name longer than the lake's file system allows.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from deltalake import DeltaTable

from consumer.sink import commit_error
from shared.errors import CommitConflict, CommitFailed, RowsRejected
from shared.wire import encode_update
from tests.helpers import (
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    run_consumer,
)

_LONG_SYMBOL = "\u00e9" * 32  # 64 bytes: the most the wire allows
# A data file: <lake>/position_updates/symbol=<folder>/part-00000-<uuid>-c000.snappy.parquet
_FILE_TAIL = len("/position_updates/") + 1 + len("part-00000-") + 36 + len("-c000.snappy.parquet")


def _deep_lake(tmp_path: Path) -> Path:
    """A lake whose path leaves room for short partition folders only."""
    long_folder = len("symbol=") + 3 * len(_LONG_SYMBOL.encode())  # 199
    target = 4_095 - _FILE_TAIL - 40  # room for ~40-byte folders, not for 199
    assert target + _FILE_TAIL + long_folder > 4_095
    lake = tmp_path
    while len(str(lake)) < target - 201:
        lake = lake / ("d" * 200)
    lake = lake / ("e" * (target - len(str(lake)) - 1))
    os.makedirs(lake)
    assert len(str(lake)) == target
    return lake


def test_rows_the_table_cannot_hold_are_bisected_out(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    lake = _deep_lake(tmp_path)
    client: Any = redis.Redis.from_url(redis_url)
    updates = make_updates(1_000, seed=8)
    bad_ids: list[bytes] = []
    for i, update in enumerate(updates):
        client.xadd(stream, encode_update(update))
        if i in (10, 11, 400, 999):
            bad = msgspec.structs.replace(
                update, symbol=_LONG_SYMBOL, conid=900_000 + i, timestamp=update.timestamp
            )
            bad_ids.append(client.xadd(stream, encode_update(bad)))
    env = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=500, read_count=250,
    )  # fmt: skip
    log = tmp_path / "c.log"
    assert run_consumer(env, log=log) == 0
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
    letters: Any = client.xrange(f"{stream}:dlq")
    assert sorted(f[b"dlq:source_id"] for _, f in letters) == sorted(bad_ids)
    for _, dead in letters:
        reason = dead[b"dlq:reason"].decode()
        assert reason.startswith("position_updates cannot hold the row"), reason
        assert "File name too long" in reason
        assert b"dlq:truncated" not in dead
        original = client.xrange(stream, min=dead[b"dlq:source_id"], max=dead[b"dlq:source_id"])
        assert dead[b"payload"] == original[0][1][b"payload"]  # the original entry
    assert "commit rejected, bisecting" in log.read_text()


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENAMETOOLONG, RowsRejected),
        (errno.EILSEQ, RowsRejected),
        (errno.EACCES, CommitFailed),
        (errno.ENOSPC, CommitFailed),
        (errno.EROFS, CommitFailed),
        (errno.EIO, CommitFailed),
        (errno.ECONNRESET, CommitFailed),
        (errno.ETIMEDOUT, CommitFailed),
    ],
)
def test_os_errors_are_classified(code: int, kind: type[Exception]) -> None:
    error = commit_error(OSError(code, os.strerror(code)), "position_updates")
    assert type(error) is kind
    assert not isinstance(error, CommitConflict)


def test_rows_only_positions_current_rejects_are_dead_lettered_after_landing(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    """``positions_current`` is one byte longer than ``position_updates``: on a lake
    whose path leaves room for ~30-byte symbol folders, symbols of growing length
    land in both tables, then (at the one boundary length) in the history only, then
    in neither. Each is handled where it fails; the consumer never stops."""
    target = 4_095 - _FILE_TAIL - len("symbol=") - 30
    lake = tmp_path
    while len(str(lake)) < target - 201:
        lake = lake / ("d" * 200)
    lake = lake / ("e" * (target - len(str(lake)) - 1))
    os.makedirs(lake)
    client: Any = redis.Redis.from_url(redis_url)
    base = make_updates(1, seed=3)[0]
    by_length: dict[int, bytes] = {}
    for length in range(20, 41):
        update = msgspec.structs.replace(base, symbol="S" * length, conid=500_000 + length)
        by_length[length] = client.xadd(stream, encode_update(update))
    env = consumer_env(redis_url, lake, "c1", stream)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert group_pending(redis_url, stream) == 0

    history = {
        len(s)
        for s in DeltaTable(str(lake / "position_updates"))
        .to_pyarrow_table()
        .column("symbol")
        .to_pylist()
    }
    current = {
        len(s)
        for s in DeltaTable(str(lake / "positions_current"))
        .to_pyarrow_table()
        .column("symbol")
        .to_pylist()
    }
    letters: Any = client.xrange(f"{stream}:dlq")
    length_of = {v: k for k, v in by_length.items()}
    reasons = {length_of[f[b"dlq:source_id"]]: f[b"dlq:reason"].decode() for _, f in letters}
    boundary = [n for n, r in reasons.items() if r.startswith("positions_current cannot hold")]
    assert len(boundary) == 1, reasons
    edge = boundary[0]
    assert "(the row is in position_updates)" in reasons[edge]
    assert current == set(range(20, edge))
    assert history == set(range(20, edge + 1))
    assert set(reasons) == set(range(edge, 41))
    assert all(reasons[n].startswith("position_updates cannot hold") for n in range(edge + 1, 41))
