"""The lake on an S3-compatible store (SeaweedFS): the put-if-absent check at start,
ambiguous commits, maintenance and every operator command there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest

from consumer.store_check import check_put_if_absent, object_store, store_options
from infra.seaweed_server import SeaweedServer
from shared.errors import UnsafeStore
from tests.conftest import lake_on
from tests.helpers import (
    Lake,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    make_updates,
    publish,
    run_python,
)
from tests.s3_proxy import S3Proxy


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[S3Proxy]:
    """A fault proxy in front of the test worker's SeaweedFS."""
    running = S3Proxy(seaweed.endpoint, seaweed.secret_key).start()
    try:
        yield running
    finally:
        running.stop()


def _objects(lake: Lake) -> list[str]:
    store = object_store(lake.uri, lake.storage_options)
    return [meta["path"] for page in obstore.list(store) for meta in page]


def test_the_check_passes_on_seaweedfs_and_leaves_nothing(s3_lake: Lake) -> None:
    check_put_if_absent(s3_lake.uri, s3_lake.storage_options)
    assert _objects(s3_lake) == []  # the probe object is deleted again


def test_the_check_refuses_a_store_that_ignores_put_if_absent(
    seaweed: SeaweedServer, proxy: S3Proxy, redis_url: str, stream: str, tmp_path: Path
) -> None:
    lake = lake_on(seaweed, proxy.endpoint)
    check_put_if_absent(lake.uri, lake.storage_options)  # the proxy passes the header on
    proxy.set(drop_if_none_match=True)
    with pytest.raises(UnsafeStore, match="ignores If-None-Match"):
        check_put_if_absent(lake.uri, lake.storage_options)
    # The consumer stops at start, in one line, before it writes anything.
    publish(redis_url, stream, make_updates(20))
    env = consumer_env(redis_url, lake, "c1", stream)
    done = run_python(["-m", "consumer", "--drain"], env, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("poslake consumer:")]
    assert len(lines) == 1 and "POSLAKE_LAKE_URI" in lines[0]
    assert "accepted a second put-if-absent" in lines[0]
    assert "Traceback" not in done.stderr
    assert seaweed.secret_key not in done.stderr + done.stdout
    assert not [p for p in _objects(lake) if "_delta_log" in p], "a table was written"
    # Through a store that honours it, the same consumer lands everything.
    proxy.set(drop_if_none_match=False)
    done = run_python(["-m", "consumer", "--drain"], env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_table_exact(lake, make_updates(20))
    assert_current_exact(lake, make_updates(20))


def test_storage_options_map_to_the_store_and_its_client() -> None:
    config, client = store_options(
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
            "aws_access_key_id": "k",
            "AWS_ALLOW_HTTP": "true",
            "timeout": "10s",
            "AWS_S3_LOCKING_PROVIDER": "dynamodb",  # delta-rs' own: not the store's
            "max_retries": "3",
        }
    )
    assert config == {"aws_endpoint_url": "http://127.0.0.1:1", "aws_access_key_id": "k"}
    assert client == {"allow_http": "true", "timeout": "10s"}


@pytest.mark.parametrize("lost", ["503", "timeout"])
def test_a_commit_whose_reply_is_lost_lands_once(
    seaweed: SeaweedServer, proxy: S3Proxy, redis_url: str, stream: str, tmp_path: Path, lost: str
) -> None:
    """The store keeps the commit, then the reply is lost: nothing lost, nothing twice."""
    lake = lake_on(seaweed, proxy.endpoint)
    prefix = lake.uri.removeprefix("s3:/")
    updates = make_updates(1_200, seed=31)
    publish(redis_url, stream, updates)
    env = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=200,
        storage_options=json.dumps({**lake.storage_options, "timeout": "2s"}),
    )  # fmt: skip
    # Every history commit after the first: its log file is stored, its reply lost.
    proxy.set(
        fail_after_store=rf"PUT {prefix}/position_updates/_delta_log/0*([2-9]|1\d)\.json",
        fail_times=4,
        hold_s=3.0 if lost == "timeout" else 0.0,
    )
    log = tmp_path / "consumer.log"
    done = run_python(["-m", "consumer", "--drain"], env, timeout=240)
    log.write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(proxy.state()["failed"]) == 4
    assert done.stderr.count("commit landed although its reply was an error") == 4
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    history = lake.table("position_updates")
    versions = [c for c in history.history() if c.get("poslake.commit_id")]
    assert len({c["poslake.commit_id"] for c in versions}) == len(versions), "a commit twice"
    assert history.transaction_version(f"poslake:{stream}:lake") == len(versions)
