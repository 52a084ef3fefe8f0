"""``poslake reconcile``: does the lake agree with IB? A table of differences, or exit 0.

1. Read IB (poslake/ib_state.py): positions, account values, the day's executions,
   read-only, under ``POSLAKE_RECONCILE_CLIENT_ID`` (beside the producer).
2. Wait, at most ``--wait`` seconds, until the group has acknowledged everything the
   stream held once IB's answer was in (plus ``--grace`` for the producer to publish
   what IB told it meanwhile): an update in flight is not drift. Not caught up in
   time: exit 7, nothing compared.
3. Read the lake and compare (poslake/drift.py).

Exit 0 when everything agrees, 1 when anything differs (the table or ``--json``
lists it), else the codes of every command. ``--every S`` runs it for ever, every S
seconds, serving the difference counts per category as Prometheus gauges on
``POSLAKE_METRICS_PORT`` and logging each difference once while it lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import redis
from prometheus_client import CollectorRegistry

from infra.metrics import MetricsServer, StatsCollector
from poslake import drift
from poslake.command import CommandError, ExitCode, redis_client
from poslake.ib_state import IbState, IbUnreachable, read_ib
from shared import lake_names
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    differences: list[drift.Difference]
    caught_up: bool
    waited_s: float
    ib_read_s: float
    compare_s: float
    counts: dict[str, int] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="longest wait for the consumers to catch up, seconds (60)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=1.0,
        help="time for the producer to publish what IB just said (1 s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--every", type=float, help="run every S seconds for ever (metrics on POSLAKE_METRICS_PORT)"
    )
    parser.add_argument(
        "--cost-tolerance",
        type=float,
        default=drift.COST_TOLERANCE,
        help="relative tolerance of average costs (1e-4, plus a cent)",
    )
    parser.add_argument(
        "--value-tolerance",
        type=float,
        default=drift.VALUE_TOLERANCE,
        help="relative tolerance of values that move with the market (0.005)",
    )


def stream_top(client: Any, stream: str) -> str | None:
    """The newest entry ID the stream has handed out, or None without a stream."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    top = info.get("last-generated-id")
    return top.decode() if isinstance(top, bytes) else str(top) if top else None


def _id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def caught_up(client: Any, stream: str, group: str, top: str) -> bool:
    """Whether ``group`` has read and acknowledged every entry up to ``top``."""
    groups = {_text(g["name"]): g for g in client.xinfo_groups(stream)}
    state = groups.get(group)
    if state is None:
        raise CommandError(f"no group {group!r} on stream {stream!r}", ExitCode.NOT_FOUND)
    if _id(_text(state["last-delivered-id"])) < _id(top):
        return False
    if int(state["pending"]) == 0:
        return True
    oldest = client.xpending(stream, group)["min"]
    return oldest is None or _id(_text(oldest)) > _id(top)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(settings: Settings, name: str) -> pl.DataFrame | None:
    uri = settings.lake_table_uri(name)
    try:
        return pl.read_delta(uri, storage_options=settings.storage_options or None)
    except Exception as exc:
        if (
            "not found" in str(exc).lower()
            or "no such file" in str(exc).lower()
            or (isinstance(exc, FileNotFoundError))
        ):
            return None
        raise


def compare(
    settings: Settings, ib: IbState, tolerances: drift.Tolerances
) -> list[drift.Difference]:
    current = _read(settings, lake_names.POSITIONS_CURRENT)
    executions = _read(settings, lake_names.EXECUTIONS)
    values = _read(settings, lake_names.ACCOUNT_VALUES_CURRENT)
    snapshots = _read(settings, lake_names.POSITION_SNAPSHOTS)
    updates = _read(settings, lake_names.POSITION_UPDATES)
    since = drift.day_start(ib.read_at)
    fills = executions if executions is not None else _no_executions()
    out = drift.compare_positions(
        ib, current if current is not None else _no_positions(), tolerances
    )
    out += drift.compare_executions(ib, fills, since, tolerances)
    out += drift.compare_values(ib, values if values is not None else _no_values(), tolerances)
    if snapshots is not None and updates is not None:
        history = updates.select("account", "conid", "position", "timestamp")
        out += drift.check_fills_add_up(ib.accounts, snapshots, history, fills)
    return out


def _no_positions() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "account": pl.String,
            "conid": pl.Int64,
            "position": pl.Float64,
            "average_cost": pl.Float64,
        }
    )


def _no_executions() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "exec_base": pl.String,
            "exec_id": pl.String,
            "account": pl.String,
            "time": pl.Datetime("us", "UTC"),
            "commission": pl.Float64,
            "shares": pl.Float64,
            "side": pl.String,
            "conid": pl.Int64,
        }
    )


def _no_values() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"account": pl.String, "key": pl.String, "currency": pl.String, "value": pl.String}
    )


def reconcile_once(settings: Settings, args: argparse.Namespace) -> Outcome:
    tolerances = drift.Tolerances(
        average_cost=args.cost_tolerance, market_value=args.value_tolerance
    )
    started = time.monotonic()
    try:
        ib = asyncio.run(read_ib(settings, settings.reconcile_client_id))
    except IbUnreachable as exc:
        raise CommandError(str(exc), ExitCode.UNREACHABLE) from None
    ib_read_s = time.monotonic() - started
    time.sleep(max(0.0, args.grace))
    waited_from = time.monotonic()
    with redis_client(settings) as client:
        top = stream_top(client, settings.stream)
        ready = top is None or caught_up(client, settings.stream, settings.group, top)
        while not ready and time.monotonic() - waited_from < args.wait:
            time.sleep(0.2)
            ready = caught_up(client, settings.stream, settings.group, top or "0-0")
    waited_s = time.monotonic() - waited_from
    if not ready:
        return Outcome([], False, waited_s, ib_read_s, 0.0)
    compared_at = time.monotonic()
    differences = compare(settings, ib, tolerances)
    counts = {category: 0 for category in drift.CATEGORIES}
    for difference in differences:
        counts[difference.category] += 1
    return Outcome(differences, True, waited_s, ib_read_s, time.monotonic() - compared_at, counts)


def render(outcome: Outcome) -> str:
    if not outcome.caught_up:
        return (
            f"the consumers did not catch up within {outcome.waited_s:.0f}s: nothing "
            "compared (an update in flight is not drift); try a longer --wait"
        )
    if not outcome.differences:
        return "the lake agrees with IB: " + ", ".join(
            f"0 {category}" for category in drift.CATEGORIES
        )
    headers = ("category", "account", "item", "what", "IB", "lake")
    rows = [(d.category, d.account, d.item, d.what, d.ib, d.lake) for d in outcome.differences]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    summary = ", ".join(f"{n} {c}" for c, n in outcome.counts.items())
    return "\n".join([*lines, f"{len(rows)} differences: {summary}"])


def _exit_code(outcome: Outcome) -> int:
    if not outcome.caught_up:
        return ExitCode.BEHIND
    return ExitCode.FAILED if outcome.differences else ExitCode.OK


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.reconcile_client_id == settings.ib_client_id:
        # Only here: a producer's own settings may well name either ID.
        raise CommandError(
            "POSLAKE_RECONCILE_CLIENT_ID must differ from POSLAKE_IB_CLIENT_ID "
            f"({settings.ib_client_id}): IB refuses a second connection with one client ID",
            ExitCode.BAD_INPUT,
        )
    if args.every is not None:
        return run_every(args, settings)
    outcome = reconcile_once(settings, args)
    if args.json:
        print(
            json.dumps(
                {
                    "caught_up": outcome.caught_up,
                    "counts": outcome.counts,
                    "differences": drift.as_rows(outcome.differences),
                    "ib_read_s": round(outcome.ib_read_s, 3),
                    "compare_s": round(outcome.compare_s, 3),
                },
                indent=2,
            )
        )
    else:
        print(render(outcome))
    return _exit_code(outcome)


def run_every(args: argparse.Namespace, settings: Settings) -> int:
    """Reconcile every ``args.every`` seconds until SIGTERM/SIGINT; gauges per category."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gauges: dict[str, float] = {"runs": 0, "behind": 0, "errors": 0, "last_run_age_s": 0}
    gauges.update({f"differences_{c}": 0 for c in drift.CATEGORIES})
    last_run = [time.monotonic()]

    def read() -> dict[str, float]:
        return gauges | {"last_run_age_s": time.monotonic() - last_run[0]}

    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        StatsCollector(
            "poslake_reconcile",
            read,
            {"runs": "reconcile runs"},
            {
                **{
                    f"differences_{c}": f"differences found in {c} by the last run"
                    for c in drift.CATEGORIES
                },
                "behind": "1 when the last run found the consumers behind (nothing compared)",
                "errors": "1 when the last run failed (IB, Redis or the lake unreachable)",
                "last_run_age_s": "seconds since the last run ended",
            },
        )
    )
    server = MetricsServer(registry, lambda: (gauges["errors"] == 0, "ok"))
    server.start(settings.metrics_host, settings.metrics_port)
    reported: set[tuple[str, ...]] = set()
    try:
        while not stop.is_set():
            try:
                outcome = reconcile_once(settings, args)
                gauges["errors"] = 0
            except CommandError as exc:
                gauges["errors"] = 1
                log.error("reconcile failed", extra={"error": str(exc)})
                stop.wait(args.every)
                continue
            gauges["runs"] += 1
            gauges["behind"] = 0 if outcome.caught_up else 1
            last_run[0] = time.monotonic()
            if outcome.caught_up:
                for category, count in outcome.counts.items():
                    gauges[f"differences_{category}"] = count
                now = {d.key for d in outcome.differences}
                for difference in outcome.differences:
                    if difference.key not in reported:
                        log.warning("lake differs from IB", extra=difference.as_dict())
                reported = now
            else:
                log.warning(
                    "consumers behind: nothing compared", extra={"waited_s": outcome.waited_s}
                )
            stop.wait(args.every)
    finally:
        server.stop()
    return ExitCode.OK
