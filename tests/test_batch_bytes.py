"""Batches close on bytes as well as on entries, and reads shrink for big entries."""

from __future__ import annotations

import re
from pathlib import Path

from shared.wire import encode_update
from tests.helpers import (
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
)


def test_batch_closes_on_bytes(redis_url: str, lake: Path, stream: str, tmp_path: Path) -> None:
    updates = make_updates(3_000, seed=12)
    publish(redis_url, stream, updates)
    entry_size = sum(len(encode_update(u)["payload"]) for u in updates) / len(updates)
    limit = 65_536
    env = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=100_000, read_count=1_000,
        batch_max_bytes=limit,
    )  # fmt: skip
    log = tmp_path / "c.log"
    assert run_consumer(env, log=log) == 0
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
    sizes = [int(n) for n in re.findall(r"batch settled .*?entries=(\d+)", log.read_text())]
    assert sum(sizes) == len(updates)
    # The first read knows no sizes (1,000 entries); every later one is sized to the bytes.
    assert sizes[0] <= 1_000
    assert all(n * entry_size <= limit * 1.1 for n in sizes[1:]), (sizes, entry_size)
    assert len(sizes) >= 1 + (len(updates) - sizes[0]) * entry_size // limit
