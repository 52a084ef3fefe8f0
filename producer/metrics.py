"""The producer's Prometheus metrics and health check (served by infra.metrics)."""

from __future__ import annotations

from dataclasses import asdict

from prometheus_client import CollectorRegistry

from infra.metrics import LabelledCounter, StatsCollector
from producer.ib_source import IbSource
from producer.outbox import Outbox

COUNTERS = {
    "received": "position messages received from IB",
    "published": "updates handed to the stream writer (updates in)",
    "unmappable": "IB updates skipped because the contract does not fit the model",
    "connects": "successful IB connections (1 plus reconnects)",
    "disconnects": "IB connections lost",
    "client_id_refusals": "IB error 326 (client ID in use)",
    "probes_failed": "liveness probes IB did not answer",
    "xadd_published": "entries XADDed to the stream",
    "recognised_duplicates": "retried XADDs recognised by their explicit IDs",
    "spooled": "updates written to the spool file while Redis was away",
    "replayed_from_spool": "updates published from the spool file",
    "redis_retries": "publishing retries after Redis errors",
    "unreplicated": "pipelines too few replicas confirmed in time (sent again)",
    "ids_moved_past": "reconnects that found the stream's top behind (XSETID moved it past)",
    "pnl_subscribes": "PnL-single subscriptions sent",
    "pnl_cancels": "PnL-single cancels sent",
    "pnl_reused": "positions reopened within the grace period (no request sent)",
    "greeks_computations": "option computations received on the producer's market-data lines",
    "greeks_published": "option_greeks entries published",
    "greeks_held_back": "option computations not published (unchanged within the interval)",
    "greeks_not_computed": "option values IB sent as not computed or unset (published as null)",
    "greeks_requests": "market-data requests sent (subscribe, snapshot, cancel, data type)",
    "greeks_snapshots": "market-data snapshots requested (rotation past the line budget)",
    "greeks_snapshot_timeouts": "snapshots IB did not end in time (cancelled)",
    "greeks_data_type_fallbacks": "switches to delayed market data (live not permitted)",
}
GAUGES = {
    "buffered": "updates waiting in memory for the stream",
    "ib_connected": "1 while connected to IB",
    "redis_connected": "1 while the writer has a Redis connection",
    "redis_ok": "1 while publishing works, 0 while a Redis failure is retried",
    "ib_request_queue": "requests ib_async holds back under its 45/s throttle",
    "pnl_subscriptions": "PnL-single subscriptions held (closed ones in their grace period too)",
    "pnl_pending": "open positions waiting for a PnL-single subscription",
    "greeks_options": "options held by any followed account (one market-data need each)",
    "greeks_lines": "market-data lines in use (streaming and snapshots in flight)",
    "greeks_streaming": "options with a streaming market-data line",
    "greeks_rotated": "options served by snapshots in rotation (or waiting for a line)",
    "greeks_line_limit": "market-data lines usable now (the budget, or fewer after a 101)",
    "greeks_data_type": "the session's market data type (1 live ... 4 delayed frozen)",
    "greeks_oldest_sample_s": "seconds since the stalest held option's last computation",
}


class ProducerMetrics:
    def __init__(self, source: IbSource, outbox: Outbox) -> None:
        self.source = source
        self.outbox = outbox
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector("poslake_producer", self._read, COUNTERS, GAUGES))
        self.registry.register(
            LabelledCounter(
                "poslake_producer_redis_errors",
                "failed publishing attempts by code (OOM, NOPERM, WRONGPASS, CONNECTION...)",
                "code",
                outbox.health.counts,
            )
        )
        self.registry.register(
            LabelledCounter(
                "poslake_producer_greeks_errors",
                "market-data errors of the Greeks lines by IB code (354, 101, 10167, 10197...)",
                "code",
                lambda: dict(source.greeks.stats.errors),
            )
        )

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {k: float(v) for k, v in asdict(self.source.stats).items()}
        box = self.outbox.stats
        values.update(
            xadd_published=box.published,
            recognised_duplicates=box.recognised_duplicates,
            spooled=box.spooled,
            replayed_from_spool=box.replayed_from_spool,
            redis_retries=box.retries,
            unreplicated=box.unreplicated,
            ids_moved_past=box.ids_moved_past,
            buffered=self.outbox.buffered,
            ib_connected=1.0 if self.source.ib.isConnected() else 0.0,
            redis_connected=1.0 if self.outbox.connected else 0.0,
            redis_ok=1.0 if self.outbox.health.ok else 0.0,
        )
        subscriptions = self.source.subscriptions
        values.update(
            pnl_subscribes=subscriptions.stats.subscribes,
            pnl_cancels=subscriptions.stats.cancels,
            pnl_reused=subscriptions.stats.reused,
            ib_request_queue=subscriptions.ib_queue(),
            pnl_subscriptions=subscriptions.active,
            pnl_pending=subscriptions.pending,
        )
        greeks, lines = self.source.greeks, self.source.greeks.lines
        values.update(
            greeks_computations=greeks.stats.computations,
            greeks_published=greeks.stats.published,
            greeks_held_back=greeks.stats.held_back,
            greeks_not_computed=greeks.stats.not_computed,
            greeks_data_type_fallbacks=greeks.stats.data_type_fallbacks,
            greeks_requests=lines.stats.requests,
            greeks_snapshots=lines.stats.snapshots,
            greeks_snapshot_timeouts=lines.stats.snapshot_timeouts,
            greeks_options=greeks.options,
            greeks_lines=lines.in_use,
            greeks_streaming=len(lines.streaming),
            greeks_rotated=lines.rotated,
            greeks_line_limit=lines.limit,
            greeks_data_type=greeks.data_type,
            greeks_oldest_sample_s=greeks.oldest_sample_s(),
        )
        return values

    def health(self) -> tuple[bool, str]:
        # The producer reconnects by itself and buffers through a Redis outage, but says
        # so: a refusal (password, ACL) needs an operator, an outage may need one.
        if self.outbox.writer_failed():
            return False, "stream writer stopped"
        if not self.outbox.health.ok:
            return False, f"{self.outbox.health.reason()} ({self.outbox.buffered} buffered)"
        state = "ib connected" if self.source.ib.isConnected() else "ib reconnecting"
        return True, f"ok ({state}, {self.outbox.buffered} buffered)"
