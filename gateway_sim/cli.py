"""``python -m gateway_sim``: the gateway simulator as a program (its flags, the record
and final-state files it writes, a clean stop on SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import Counter
from pathlib import Path

from gateway_sim import market_data as md
from gateway_sim.fills import EXEC_TIME_FORMATS, FillFaults
from gateway_sim.session import SentUpdate
from gateway_sim.simulator import STARTUP_REQUESTS, GatewaySimulator, SimulatorConfig
from infra.logs import configure_logging
from infra.stopping import release_held_stops


def _record_line(update: SentUpdate) -> str:
    instrument = update.instrument
    return json.dumps(
        {
            "seq": update.seq,
            "sent_ns": update.sent_ns,
            "kind": update.kind,
            "account": update.account,
            "conid": instrument.conid,
            "symbol": instrument.symbol,
            "position": update.position,
            "market_price": update.market_price,
            "market_value": update.market_value,
            "average_cost": update.average_cost,
        }
    )


async def serve(
    config: SimulatorConfig,
    record_path: Path | None,
    state_path: Path | None,
    stats_path: Path | None = None,
) -> int:
    simulator = GatewaySimulator(config)
    # Signals first: a parent may stop us as soon as it reads the line below.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    release_held_stops()  # a stop sent while it started is delivered now
    port = await simulator.start()
    print(f"gateway simulator listening on {config.host}:{port}", flush=True)
    written = fills_written = 0
    record_file = record_path.open("a") if record_path else None
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            if record_file is not None:
                pending = simulator.record[written:]
                record_file.writelines(_record_line(u) + "\n" for u in pending)
                fills = simulator.fills_sent[fills_written:]
                record_file.writelines(
                    json.dumps({"kind": "fill", "exec_id": e, "sent_ns": ns}) + "\n"
                    for e, ns in fills
                )
                record_file.flush()
                written += len(pending)
                fills_written += len(fills)
    finally:
        await simulator.stop()
        if record_file is not None:
            record_file.close()
        if state_path is not None:
            state_path.write_text(json.dumps(simulator.final_state()))
        if stats_path is not None:
            stats_path.write_text(json.dumps(simulator.sent_stats()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_sim",
        description="A TWS API gateway simulator with a synthetic, seeded portfolio.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4002, help="0 picks a free port")
    parser.add_argument(
        "--accounts", default="DU100001,DU100002,DU100003", help="comma-separated account IDs"
    )
    parser.add_argument("--positions", type=int, default=200, help="open positions to hold")
    parser.add_argument("--rate", type=float, default=50.0, help="portfolio events per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drop-after", type=float, help="drop each connection after S seconds")
    parser.add_argument(
        "--drop-probability",
        type=float,
        default=0.0,
        help="chance per second of dropping every connection",
    )
    parser.add_argument(
        "--refuse-client-id",
        type=int,
        action="append",
        default=[],
        help="answer this client ID with error 326 (repeatable)",
    )
    parser.add_argument(
        "--unanswered",
        action="append",
        default=[],
        choices=sorted(STARTUP_REQUESTS),
        help="leave this startup request unanswered on the first connection",
    )
    fills = parser.add_argument_group("fills (probabilities per fill; combos per option open)")
    fills.add_argument("--commission-first", type=float, default=0.0)
    fills.add_argument("--commission-missing", type=float, default=0.0)
    fills.add_argument("--correction", type=float, default=0.0)
    fills.add_argument("--combo", type=float, default=0.1)
    fills.add_argument("--no-fills", action="store_true", help="change positions without fills")
    fills.add_argument("--position-changes-per-s", type=float,
                       help="at most this many position changes (fills) a second; the other "
                       "events move prices")  # fmt: skip
    fills.add_argument("--exec-time-format", choices=EXEC_TIME_FORMATS, default="utc")
    md.add_arguments(parser)
    parser.add_argument("--record", type=Path, help="append every sent update here (JSON lines)")
    parser.add_argument("--final-state", type=Path, help="write the final book here at exit")
    parser.add_argument(
        "--stats", type=Path, help="write message counts and first/last send times here at exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("INFO")
    accounts = [a.strip() for a in args.accounts.split(",") if a.strip()]
    try:
        config = SimulatorConfig(
            host=args.host,
            port=args.port,
            accounts=accounts,
            positions=args.positions,
            rate=args.rate,
            seed=args.seed,
            record=args.record is not None,
            drop_after_s=args.drop_after,
            drop_probability_per_s=args.drop_probability,
            refused_client_ids=set(args.refuse_client_id),
            unanswered=Counter(args.unanswered),
            fills=not args.no_fills,
            fill_faults=FillFaults(
                commission_first=args.commission_first,
                commission_missing=args.commission_missing,
                correction=args.correction,
                combo=args.combo,
            ),
            exec_time_format=args.exec_time_format,
            position_changes_per_s=args.position_changes_per_s,
            **md.config_values(args),
        )
        return asyncio.run(serve(config, args.record, args.final_state, args.stats))
    except (ValueError, OSError) as exc:
        print(f"gateway simulator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
