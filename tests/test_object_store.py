"""The lake on an S3-compatible store (SeaweedFS): the put-if-absent check at start,
ambiguous commits, maintenance and every operator command there."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import obstore
import pyarrow as pa
import pytest

from consumer.store_check import check_put_if_absent, object_store, store_options
from consumer.vacuum import sweep_orphans
from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from infra.seaweed_server import SeaweedServer
from shared.errors import UnsafeStore
from tests.conftest import lake_on
from tests.helpers import (
    REPO_ROOT,
    Lake,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    current_rows,
    kill,
    make_updates,
    publish,
    run_python,
    start_consumer,
)
from tests.producer_harness import assert_matches_record, pause_and_drain, read_stream
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
    maintain = run_python(["-m", "poslake", "maintain"], env, timeout=60)
    assert maintain.returncode == 2 and "ignores If-None-Match" in maintain.stderr
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
    # Unprefixed store options, as delta-rs takes them too, reach the store.
    config, client = store_options({"endpoint": "http://x:1", "secret_access_key": "s"})
    assert config == {"endpoint": "http://x:1", "secret_access_key": "s"} and client == {}


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


def _poslake(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "poslake", *args], env, timeout=120)


def test_maintenance_and_every_operator_command_on_seaweedfs(
    s3_lake: Lake, redis_url: str, stream: str, tmp_path: Path
) -> None:
    lake = s3_lake
    updates = make_updates(1_000, seed=41)
    publish(redis_url, stream, updates)
    # Small batches and eager maintenance: the consumer compacts and checkpoints there.
    env = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=50,
        maintenance_every_commits=5, compact_min_small_files=2,
    )  # fmt: skip
    done = run_python(["-m", "consumer", "--drain"], env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compacted partitions" in done.stderr and "checkpoint written" in done.stderr
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    history = lake.table("position_updates")
    assert any(c.get("operation") == "OPTIMIZE" for c in history.history())
    assert any(p.endswith("_last_checkpoint") for p in _objects(lake))

    status = _poslake(env, "status")
    assert status.returncode == 0, status.stderr
    assert "1000 rows" in status.stdout and lake.storage_options["AWS_SECRET_ACCESS_KEY"] not in (
        status.stdout + status.stderr
    )
    out = tmp_path / "current.csv"
    query = _poslake(
        env, "query", "table", "positions_current", "--format", "csv", "--output", str(out)
    )
    assert query.returncode == 0, query.stderr
    assert len(out.read_text().splitlines()) == 1 + len(current_rows(lake))
    # Time travel reaches the first batch's version through compactions and checkpoints.
    first = min(c["version"] for c in history.history() if c.get("poslake.commit_id"))
    assert lake.table("position_updates", version=first).to_pyarrow_table().num_rows == 50
    maintain = _poslake(env, "maintain", "--retention-hours", "0", "--force")
    assert maintain.returncode == 0, maintain.stderr
    assert "compacted" in maintain.stdout and "checkpoint written" in maintain.stdout
    assert_table_exact(lake, updates)

    replay = _poslake(env, "replay", "--beginning", "--yes")
    assert replay.returncode == 0, replay.stderr
    before = lake.table("position_updates").version()
    again = run_python(["-m", "consumer", "--drain"], env, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_table_exact(lake, updates)  # the replay changed nothing
    assert_current_exact(lake, updates)
    assert lake.table("position_updates").version() == before


def test_the_orphan_sweep_works_on_the_store(s3_lake: Lake, redis_url: str, stream: str) -> None:
    lake = s3_lake
    updates = make_updates(300, seed=43)
    publish(redis_url, stream, updates)
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=100)
    assert run_python(["-m", "consumer", "--drain"], env, timeout=240).returncode == 0
    table = lake.table("position_updates")
    store = object_store(lake.table_uri("position_updates"), lake.storage_options)
    live = sorted(unquote(p) for p in pa.table(table.get_add_actions()).column("path").to_pylist())
    folder = live[0].rsplit("/", 1)[0]
    orphan = f"{folder}/part-99999-orphan-c000.zstd.parquet"  # a failed write's file
    obstore.put(store, orphan, b"left by a failed commit")
    # S3's Last-Modified has whole seconds, and the sweep reads the table before it
    # looks at ages: seconds of margin both ways.
    time.sleep(7.0)
    young = f"{folder}/part-99998-being-committed-c000.zstd.parquet"
    obstore.put(store, young, b"a commit in progress")
    assert sweep_orphans(table, lake.storage_options, min_age_s=5.0) == [orphan]
    names = {p.removeprefix("position_updates/") for p in _objects(lake)}
    assert orphan not in names and young in names
    assert set(live) <= names
    assert_table_exact(lake, updates)


def test_simulator_to_seaweedfs_with_consumers_killed(
    s3_lake: Lake, redis_url: str, stream: str, tmp_path: Path
) -> None:
    """Simulator, producer and three consumers as processes, the lake on SeaweedFS; a
    consumer SIGKILLed and restarted every second or so; then every row compared."""
    lake = s3_lake
    accounts = ["DU100001", "DU100002"]
    thread = SimulatorThread(SimulatorConfig(accounts=accounts, positions=60, rate=150, seed=7))
    port = thread.start()

    def env(name: str) -> dict[str, str]:
        return consumer_env(
            redis_url, lake, name, stream, batch_max_wait_s=0.3, batch_max_entries=200,
            claim_min_idle_s=1,
        )  # fmt: skip

    producer_env = env("producer") | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "POSLAKE_PRODUCER_EXPLICIT_IDS": "true",
    }
    with (tmp_path / "producer.log").open("wb") as out:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer"], env=producer_env, cwd=REPO_ROOT,
            stdout=out, stderr=out,
        )  # fmt: skip
    names = ["c0", "c1", "c2"]
    consumers = {n: start_consumer(env(n), log=tmp_path / f"{n}.log") for n in names}
    rng = random.Random(3)
    kills = 0
    try:
        while thread.simulator.events < 1_200:
            time.sleep(rng.uniform(0.6, 1.4))
            victim = rng.choice(names)
            kill(consumers[victim])
            kills += 1
            consumers[victim] = start_consumer(env(victim), log=tmp_path / f"{victim}.log")
        sent = pause_and_drain(thread, producer, redis_url, stream, lake, accounts)
        for process in consumers.values():
            process.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in consumers.values()] == [0, 0, 0]
    finally:
        kill(producer)
        for process in consumers.values():
            kill(process)
        thread.stop()
    assert kills >= 4
    updates = read_stream(redis_url, stream)
    assert_matches_record(updates, sent)
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
