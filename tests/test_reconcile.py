"""``poslake reconcile`` against the simulator through the real ib_async client, beside a
running producer and consumer: exit 0 when the lake agrees, 1 with the right category and
contract for each drift made on purpose, 7 while the consumers are held back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import REPO_ROOT, consumer_env, kill, read_frame, run_python, wait_until

ACCOUNTS = ["DU100001", "DU100002"]


@dataclass
class Pipeline:
    thread: SimulatorThread
    env: dict[str, str]
    consumer: subprocess.Popen[bytes]
    lake: Path

    def book(self) -> dict[tuple[str, int], float]:
        holdings = list(self.thread.simulator.portfolio.holdings.values())
        return {(h.account, h.instrument.conid): h.position for h in holdings}

    def settled(self) -> None:
        """Wait until positions_current holds the simulator's book."""

        def same() -> bool:
            if not (self.lake / "positions_current" / "_delta_log").exists():
                return False
            current = read_frame(self.lake, "positions_current").filter(pl.col("position") != 0)
            return {(r["account"], r["conid"]): r["position"] for r in current.to_dicts()} == (
                self.book()
            )

        wait_until(same, timeout=60, interval=0.3)

    def reconcile(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_python(["-m", "poslake", "reconcile", "--json", *args], self.env,
                          timeout=timeout)  # fmt: skip


@pytest.fixture
def pipeline(redis_url: str, stream: str, lake: Path, tmp_path: Path) -> Iterator[Pipeline]:
    config = SimulatorConfig(accounts=ACCOUNTS, positions=30, rate=0, seed=9,
                             account_values_every_s=0.5)  # fmt: skip
    thread = SimulatorThread(config)
    port = thread.start()
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_wait_s=0.2) | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_IB_ACCOUNTS": ",".join(ACCOUNTS),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "POSLAKE_IB_GREEKS": "false",
    }
    with (tmp_path / "producer.log").open("ab") as out:
        producer = subprocess.Popen([sys.executable, "-m", "producer"], env=env, cwd=REPO_ROOT,
                                    stdout=out, stderr=out)  # fmt: skip
    consumer = subprocess.Popen([sys.executable, "-m", "consumer"], env=env, cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    built = Pipeline(thread, env, consumer, lake)
    try:
        built.settled()
        time.sleep(2.5)  # past the connect's snapshot: fills after it are judged
        # Some fills of the day, with their commissions.
        for account, conid in list(built.book())[:4]:
            thread.run("set_position", account, conid, built.book()[(account, conid)] + 3)
        built.settled()
        yield built
    finally:
        for proc in (producer, consumer):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        for proc in (producer, consumer):
            try:
                proc.wait(timeout=30)
            finally:
                kill(proc)
        thread.stop()


def test_reconcile_agrees_then_catches_each_drift(pipeline: Pipeline) -> None:
    done = pipeline.reconcile()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["caught_up"] and report["differences"] == []
    assert set(report["counts"]) == {"position", "execution", "account_value", "fills"}
    human = run_python(["-m", "poslake", "reconcile"], pipeline.env)
    assert human.returncode == 0 and "the lake agrees with IB" in human.stdout

    book = list(pipeline.book())
    unseen = next(k for k in book if k[0] == ACCOUNTS[0])
    unfilled = next(k for k in book if k[0] == ACCOUNTS[1])
    pipeline.thread.run("fill_unseen", unseen[0], unseen[1], 2.0)
    pipeline.thread.run("change_without_fill", unfilled[0], unfilled[1],
                        pipeline.book()[unfilled] - 1)  # fmt: skip
    pipeline.thread.run("set_value_quietly", ACCOUNTS[0], "TotalCashValue", "123.45")
    pipeline.settled()
    done = pipeline.reconcile()
    assert done.returncode == 1, done.stdout + done.stderr
    found = {(d["category"], d["account"], d["item"], d["what"])
             for d in json.loads(done.stdout)["differences"]}  # fmt: skip
    unseen_exec = [f for f in found if f[0] == "execution"]
    assert unseen_exec == [("execution", unseen[0], unseen_exec[0][2], "only in IB")]
    assert ("fills", unseen[0], str(unseen[1]), "fills vs position change") in found
    assert ("fills", unfilled[0], str(unfilled[1]), "fills vs position change") in found
    assert ("account_value", ACCOUNTS[0], "TotalCashValue USD", "value") in found
    # Positions agree (the changes reached the lake), so nothing else is reported.
    assert len(found) == 4, found
    human = run_python(["-m", "poslake", "reconcile"], pipeline.env)
    assert human.returncode == 1 and "4 differences" in human.stdout
    assert str(unseen[1]) in human.stdout and "TotalCashValue" in human.stdout


def test_updates_in_flight_are_waited_for_not_reported(pipeline: Pipeline) -> None:
    pipeline.consumer.send_signal(signal.SIGSTOP)  # the consumers are behind
    try:
        account, conid = next(iter(pipeline.book()))
        pipeline.thread.run("set_position", account, conid, pipeline.book()[(account, conid)] + 5)
        behind = pipeline.reconcile("--wait", "1")
        assert behind.returncode == 7, behind.stdout + behind.stderr
        assert json.loads(behind.stdout)["caught_up"] is False
        waiting = subprocess.Popen(
            [sys.executable, "-m", "poslake", "reconcile", "--json", "--wait", "60"],
            env=pipeline.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(6)  # it has read IB by now and waits for the consumers
        assert waiting.poll() is None
    finally:
        pipeline.consumer.send_signal(signal.SIGCONT)
    out, err = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, out + err
    assert json.loads(out)["differences"] == []


def test_reconcile_refuses_its_client_id_equal_to_the_producers(pipeline: Pipeline) -> None:
    env = pipeline.env | {"POSLAKE_RECONCILE_CLIENT_ID": "17", "POSLAKE_IB_CLIENT_ID": "17"}
    done = run_python(["-m", "poslake", "reconcile"], env)
    assert done.returncode == 2 and "POSLAKE_RECONCILE_CLIENT_ID" in done.stderr
    assert "Traceback" not in done.stderr
