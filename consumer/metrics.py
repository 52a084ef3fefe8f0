"""The consumer's Prometheus metrics and health check (served by infra.metrics)."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from redis.backoff import NoBackoff
from redis.retry import Retry

from consumer.runner import Consumer
from consumer.sink import DeltaSink
from infra.metrics import LabelledCounter, StatsCollector
from infra.redis_conn import sync_client
from infra.redis_errors import kind_of, refusal
from infra.stream_lag import group_lag

log = logging.getLogger(__name__)

# The lag is counted up to this (ten XRANGE pages a scrape at most); past it the gauge
# shows this bound (infra/stream_lag.py): alert on it, not on exact values beyond.
LAG_COUNT_MAX = 10_000
COUNTERS = {
    "batches": "batches committed and acknowledged",
    "entries": "stream entries settled (updates out of the stream)",
    "rows_written": "rows appended to the table",
    "duplicates": "updates dropped as already stored",
    "dead_letters": "entries moved to the dead-letter stream",
    "commit_retries": "history table commits retried (conflict or failure)",
    "current_commit_retries": "current table merges retried (conflict or failure)",
    "redis_retries": "Redis calls retried after a transient failure",
    "maintenance_lease_errors": "maintenance lease SET/GET/DEL refused or failed",
    "stream_trimmed": "acknowledged entries this consumer trimmed from the stream",
    "dlq_trimmed": "dead letters dropped by the dead-letter stream's bound",
    "snapshot_closes": "rows closed by complete snapshots (positions and values gone)",
}
GAUGES = {
    "lag": "entries the group has not read yet (counted up to 10,000: at least that many)",
    "pending": "entries this consumer holds unacknowledged",
    "group_pending": "entries the whole group holds unacknowledged",
    "seconds_since_progress": "seconds since the consume loop last went round",
    "redis_ok": "1 while no Redis call is failing, 0 while one is retried",
    # Its memory is ~8 bytes a key, growing by design up to POSLAKE_DEDUP_INDEX_MAX_KEYS.
    "dedup_index_keys": "keys held by the in-memory dedup index",
    "dedup_index_contracts": "contracts (account, conid) the dedup index holds keys of",
    "stream_bytes": "the stream's memory in Redis after the last trim (MEMORY USAGE)",
    "stream_over_cap": "1 while unacknowledged entries alone exceed POSLAKE_STREAM_MAX_BYTES",
    "trim_seconds": "how long the last trim took",
}


class ConsumerMetrics:
    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        settings = consumer.settings
        # No retries of its own: a scrape during an outage answers at once.
        self._client: Any = sync_client(
            settings.redis_target,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self._refused = ""  # the last refusal warned about
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector("poslake_consumer", self._read, COUNTERS, GAUGES))
        self.registry.register(
            LabelledCounter(
                "poslake_consumer_redis_errors",
                "failed Redis calls by code (OOM, LOADING, WRONGPASS, CONNECTION...)",
                "code",
                consumer.redis_health.counts,
            )
        )
        self.batch_entries = Histogram(
            "poslake_consumer_batch_entries",
            "entries per batch",
            registry=self.registry,
            buckets=(10, 100, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000),
        )
        self.commit_seconds = Histogram(
            "poslake_consumer_commit_seconds",
            "Delta commit latency",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        consumer.on_batch = self.observe

    def observe(self, entries: int, commit_seconds: float) -> None:
        self.batch_entries.observe(entries)
        self.commit_seconds.observe(commit_seconds)

    def _read(self) -> dict[str, float]:
        stats = self.consumer.stats
        values: dict[str, float] = {
            name: getattr(stats, name) for name in COUNTERS if hasattr(stats, name)
        }
        values["seconds_since_progress"] = time.monotonic() - self.consumer.heartbeat
        values["redis_ok"] = 1.0 if self.consumer.redis_health.ok else 0.0
        # Every kind's dedup index together (dict copy: the main thread fills it once).
        sinks = [s for s in dict(self.consumer.sinks).values() if isinstance(s, DeltaSink)]
        values["dedup_index_keys"] = sum(len(sink.index) for sink in sinks)
        values["dedup_index_contracts"] = sum(sink.index.contracts for sink in sinks)
        maintainer = self.consumer.maintainer
        values["maintenance_lease_errors"] = maintainer.lease_errors if maintainer else 0
        trimmer = self.consumer.trimmer
        values["stream_trimmed"] = trimmer.removed
        values["stream_bytes"] = trimmer.stream_bytes
        values["stream_over_cap"] = 1.0 if trimmer.over_cap else 0.0
        values["trim_seconds"] = trimmer.seconds
        values["dlq_trimmed"] = self.consumer.settler.dlq_trimmed
        settings = self.consumer.settings
        try:
            for group in self._client.xinfo_groups(settings.stream):
                if group["name"].decode() == settings.group:
                    # Not Redis's own: nil after a promotion, stale after an AOF restart.
                    lag = group_lag(self._client, settings.stream, group, LAG_COUNT_MAX)
                    values["lag"] = lag.entries
                    values["group_pending"] = group["pending"]
            for member in self._client.xinfo_consumers(settings.stream, settings.group):
                if member["name"].decode() == settings.consumer_name:
                    values["pending"] = member["pending"]
        except redis.RedisError as exc:  # Redis away: the stats counters still go out
            if kind_of(exc) == "fatal":  # e.g. a missing ACL right: say which, once
                reason = str(refusal(exc))
                if reason != self._refused:
                    self._refused = reason
                    log.warning("metrics cannot read the group: %s", reason)
        return values

    def health(self) -> tuple[bool, str]:
        if not self.consumer.redis_health.ok:
            return False, self.consumer.redis_health.reason()
        limit = max(60.0, 5 * self.consumer.settings.batch_max_wait_s)
        age = time.monotonic() - self.consumer.heartbeat
        if age > limit:
            return False, f"consume loop stuck for {age:.0f}s"
        if self.consumer.trimmer.over_cap:
            return False, (
                "unacknowledged entries exceed POSLAKE_STREAM_MAX_BYTES "
                f"({self.consumer.trimmer.stream_bytes} bytes): consumers are behind"
            )
        return True, "ok"
