"""Command line of the producer process (``python -m producer`` / ``poslake produce``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from infra.logs import configure_logging
from infra.metrics import MetricsServer
from infra.publisher import TrimPolicy
from infra.stopping import take_early
from producer.ib_mapping import UpdateClock
from producer.ib_source import IbSource
from producer.metrics import ProducerMetrics
from producer.outbox import Outbox
from producer.replica_wait import ReplicaWait
from shared.errors import ConfigError, ExitCode, RedisRefused
from shared.settings import Settings, load_settings_or_report

log = logging.getLogger(__name__)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    return parser or argparse.ArgumentParser(
        prog="python -m producer",
        description="Publish IB position and portfolio updates (TWS API, ib_async) "
        "to the Redis Stream.",
        epilog="All settings come from POSLAKE_* environment variables (see README).",
    )


def build_outbox(settings: Settings, clock: UpdateClock) -> Outbox:
    """The outbox the settings describe; the clock learns the stream's top from it."""
    return Outbox(
        settings.redis_url,
        settings.stream,
        spool_path=settings.spool_path,
        memory_limit=settings.producer_buffer_max,
        chunk=settings.publish_chunk,
        explicit_ids=settings.producer_explicit_ids,
        trim=TrimPolicy(settings.stream_maxlen, settings.stream_min_age_s),
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        on_stream_top=clock.raise_floor,
        wait=ReplicaWait(
            settings.producer_wait_replicas,
            settings.producer_wait_timeout_ms,
            settings.producer_wait_aof,
        ),
    )


# How long a stop waits for the IB connection to wind down (a connect in progress
# included) before cancelling it.
_IB_STOP_GRACE_S = 5.0


async def run_producer(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then flush what is buffered and exit 0.

    Exit 6 (one line on stderr) when Redis refuses the password or the right to
    XADD at start; later refusals are retried and shown on ``/healthz``.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if take_early():  # a signal during the imports (producer/__main__.py)
        stop.set()
    clock = UpdateClock()
    try:
        outbox = build_outbox(settings, clock)
    except OSError as exc:
        log.error("POSLAKE_PRODUCER_SPOOL_DIR is not usable: %s", exc)
        return 2
    source = IbSource(settings, outbox, clock)
    server: MetricsServer | None = None
    if settings.metrics_port:
        metrics = ProducerMetrics(source, outbox)
        server = MetricsServer(metrics.registry, metrics.health)
        try:
            server.start(settings.metrics_host, settings.metrics_port)
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
    try:
        await outbox.check_access()
    except RedisRefused as exc:
        log.error("redis refused, stopping", extra={"error": str(exc)})
        print(f"poslake producer: {exc}", file=sys.stderr)
        await outbox.close(0)
        if server is not None:
            server.stop()
        return ExitCode.REFUSED
    outbox.start()
    log.info("producer started", extra={"stream": settings.stream, "ib_port": settings.ib_port})
    await _run_source(source, stop)
    drained = await outbox.close(settings.producer_flush_timeout_s)
    if server is not None:
        server.stop()
    log.info(
        "producer stopped",
        extra={
            "published": outbox.stats.published,
            "duplicates_recognised": outbox.stats.recognised_duplicates,
            "spooled": outbox.stats.spooled,
            "flushed": drained,
        },
    )
    return 0


async def _run_source(source: IbSource, stop: asyncio.Event) -> None:
    """``source.run(stop)``; a stop that it does not see in time (an IB connect under
    way) cancels it after a grace period."""
    task = asyncio.create_task(source.run(stop))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        try:
            await asyncio.wait_for(asyncio.shield(task), _IB_STOP_GRACE_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            source.ib.disconnect()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def run(args: argparse.Namespace) -> int:
    settings = load_settings_or_report("poslake producer")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_json)
    return asyncio.run(run_producer(settings))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
