"""``poslake run`` end to end: private Redis, gateway simulator, producer, two consumers."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from gateway_sim.simulator import SimulatorConfig, SimulatorThread


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env.update(extra)
    return env


def test_run_then_query_matches_the_simulators_final_book(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "20", "--consumers", "2",
         "--data-dir", str(data)],
        env=_env(POSLAKE_BATCH_MAX_WAIT_S="1"), cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "poslake query positions" in result.stdout
    table = pl.read_delta(str(data / "lake" / "position_updates"))
    assert table.select(["account", "conid", "timestamp"]).is_unique().all()
    assert table["symbol"].n_unique() >= 5 and table["account"].n_unique() == 3
    summary = result.stdout.split("poslake run: ")[1]
    assert table.height == _position_entries(summary) > 0
    assert "dead letters: 0" in summary
    assert pl.read_delta(str(data / "lake" / "executions")).height > 0
    # The book ran beside the consumers and was brought up to date at the end: each
    # held contract is in it, its legs adding up to the position.
    assert "The strategy book: book up to date" in result.stdout
    legs = pl.read_delta(str(data / "lake" / "legs"))
    held_by_book = legs.group_by("account", "conid").agg(pl.col("quantity").sum())

    query = subprocess.run(
        [sys.executable, "-m", "poslake", "query", "positions", "--format", "csv"],
        env=_env(POSLAKE_LAKE_URI=str(data / "lake")), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    shown = pl.read_csv(io.StringIO(query.stdout))
    book = json.loads((data / "simulator-final-state.json").read_text())
    assert len(book) > 100
    assert {(r["account"], r["conid"], r["position"]) for r in shown.iter_rows(named=True)} == {
        (r["account"], r["conid"], r["position"]) for r in book
    }
    # Every contract held is in the book with its position. (Fills of the run's last
    # moment may land without any position of their contract: the book keeps them as
    # booked; reconcile reports such fills.)
    booked = {(r["account"], r["conid"]): r["quantity"] for r in held_by_book.iter_rows(named=True)}
    for held in book:
        assert booked.get((held["account"], held["conid"])) == held["position"], held


def test_run_says_which_part_failed(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "1", "--data-dir", str(tmp_path)],
        env=_env(POSLAKE_REDIS_URL="redis://127.0.0.1:1/0"),  # nothing listens on port 1
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 4  # ExitCode.UNREACHABLE, as for every command
    assert "redis: cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


def test_run_says_when_ib_is_unreachable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "1", "--data-dir", str(tmp_path)],
        env=_env(POSLAKE_IB_HOST="127.0.0.1", POSLAKE_IB_PORT="1"),
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 4
    assert "ib: cannot reach POSLAKE_IB_HOST=127.0.0.1 port 1" in result.stderr


def test_run_uses_configured_redis_and_ib(tmp_path: Path, redis_url: str) -> None:
    """With POSLAKE_REDIS_URL and POSLAKE_IB_HOST set, the same command uses them."""
    thread = SimulatorThread(SimulatorConfig(accounts=["DU7"], positions=20, rate=30))
    port = thread.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "poslake", "run", "--duration", "3", "--data-dir",
             str(tmp_path / "data")],
            env=_env(POSLAKE_REDIS_URL=redis_url, POSLAKE_IB_HOST="127.0.0.1",
                     POSLAKE_IB_PORT=str(port), POSLAKE_STREAM="external",
                     POSLAKE_BATCH_MAX_WAIT_S="0.5"),
            cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    finally:
        thread.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "data" / "redis").exists()  # no private server
    assert not (tmp_path / "data" / "simulator-final-state.json").exists()
    table = pl.read_delta(str(tmp_path / "data" / "lake" / "position_updates"))
    assert set(table["account"]) == {"DU7"} and table.height >= 20


def test_ctrl_c_stops_everything_in_order(tmp_path: Path) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group: the servers and
    workers must not die with it; `poslake run` stops them in flow order."""
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "poslake", "run", "--data-dir", str(data)],
        env=_env(POSLAKE_BATCH_MAX_WAIT_S="0.5"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        lake = data / "lake" / "position_updates"
        while (
            not (lake / "_delta_log").exists()
            or len(list((lake / "_delta_log").glob("*.json"))) < 3
        ):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "NOT fully drained" not in out
    summary = out.split("poslake run: ")[1]
    assert pl.read_delta(str(lake)).height == _position_entries(summary) > 0


def _position_entries(summary: str) -> int:
    """The summary's count of position entries: "N entries in stream S (A account_value,
    E execution, P position); ..."."""
    found = re.search(r"(\d+) position[,)]", summary)
    assert found is not None, summary
    return int(found.group(1))
