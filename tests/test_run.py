"""``poslake run`` end to end: private Redis, demo source, two consumer processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl


def test_run_starts_everything_and_leaves_a_complete_table(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env["POSLAKE_BATCH_MAX_WAIT_S"] = "0.5"
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "4", "--consumers", "2",
         "--data-dir", str(tmp_path / "data")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    published = int(result.stdout.split("published ")[-1].split(" updates")[0])
    table = pl.read_delta(str(tmp_path / "data" / "lake" / "position_updates"))
    assert table.height == published
    assert table.select(["account", "conid", "timestamp"]).is_unique().all()
    assert table["symbol"].n_unique() >= 5 and table["account"].n_unique() >= 3


def test_run_says_which_part_failed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env["POSLAKE_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "1", "--data-dir", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert "redis: cannot reach POSLAKE_REDIS_URL" in result.stderr
