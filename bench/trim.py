"""The consumers' stream trim (consumer/trim.py): its cost per call, against a plain XTRIM.

A private redis-server holds a stream of ``--entries`` entries (~400-byte payloads,
1 ms apart, as at 1,000 updates/s) read by one group. Per round, ``--trim`` entries
(one minute at 2,000 updates/s by default) are acknowledged below the group's
position and then removed, once by the trim script (group state read and
XTRIM MINID in one Lua call) and once, as the baseline, by a bare
``XTRIM MINID`` to the same ID (refilled in between). Also timed: a call with
nothing to trim (what every consumer pays every interval in the steady state),
and one over the memory cap. Printed: medians, the ratio script / XTRIM.

    python -m bench.trim [--entries 1000000] [--trim 120000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import redis

from bench.common import log, median, private_redis, work_dir
from consumer.trim import trim_stream

DAY_S = 86_400.0
NO_CAP = 1 << 50
PAYLOAD = json.dumps({"account": "U1234567", "conid": 495512551, "symbol": "SPY",
                      "pad": "x" * 300})  # fmt: skip


def fill(client: redis.Redis, stream: str, first_ms: int, count: int) -> None:
    for start in range(0, count, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + 10_000)):
            pipe.xadd(stream, {"v": "1", "payload": PAYLOAD}, id=f"{first_ms + i}-0")
        pipe.execute()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trim", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--trim", type=int, default=120_000, help="entries removed per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.entries, args.trim, args.rounds = 200_000, 20_000, 2
    with work_dir("trim") as scratch, private_redis(scratch) as server:
        client = redis.Redis.from_url(server.url)
        stream = "positions"
        first_ms = int(time.time() * 1000) - 10 * args.entries  # older than any window
        log(f"filling two streams of {args.entries:,} entries")
        fill(client, stream, first_ms, args.entries)
        fill(client, "baseline", first_ms, args.entries)
        memory = int(client.memory_usage(stream) or 0)
        client.xgroup_create(stream, "lake", id="0")
        script_s, plain_s, idle_s = [], [], []
        for round_no in range(args.rounds):
            # The group has read and acknowledged up to `cut`: the script may trim below it.
            cut = first_ms + (round_no + 1) * args.trim
            client.xgroup_setid(stream, "lake", f"{cut - 1}-0")
            started = time.perf_counter()
            result = trim_stream(client, stream, 0.0, NO_CAP)
            script_s.append(time.perf_counter() - started)
            assert result.removed == args.trim, result
            # The same span removed from the twin stream by a bare XTRIM (no group state).
            started = time.perf_counter()
            removed = client.xtrim("baseline", minid=f"{cut}-0", approximate=False)
            plain_s.append(time.perf_counter() - started)
            assert removed == args.trim
            # Nothing left to trim: the steady state of a consumer's periodic call.
            started = time.perf_counter()
            assert trim_stream(client, stream, 0.0, NO_CAP).removed == 0
            idle_s.append(time.perf_counter() - started)
            log(f"round {round_no + 1}: script {script_s[-1] * 1000:.1f} ms, "
                f"XTRIM {plain_s[-1] * 1000:.1f} ms")  # fmt: skip
        # Over the cap: half the acknowledged entries must go, inside a day's window.
        client.xgroup_setid(stream, "lake", "$")
        cap = max(1 << 20, memory // 2)
        started = time.perf_counter()
        capped = trim_stream(client, stream, DAY_S, cap)
        cap_s = time.perf_counter() - started
        print(f"stream: {args.entries:,} entries, {memory / 1e6:.0f} MB (MEMORY USAGE)")
        print(f"trim of {args.trim:,} acknowledged entries: script {median(script_s) * 1000:.1f} ms"
              f" median, bare XTRIM MINID {median(plain_s) * 1000:.1f} ms; ratio "
              f"{median(script_s) / median(plain_s):.2f}")  # fmt: skip
        print(f"per removed entry: {median(script_s) / args.trim * 1e6:.2f} us (script)")
        print(f"nothing to trim (the steady-state call): {median(idle_s) * 1000:.2f} ms median")
        print(f"over the cap ({cap / 1e6:.0f} MB): removed {capped.removed:,} in "
              f"{cap_s * 1000:.0f} ms, {capped.bytes_before / 1e6:.0f} -> "
              f"{capped.bytes_after / 1e6:.0f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
