"""Prometheus metrics and a health endpoint over HTTP, for the producer and the consumer.

One small threaded HTTP server per process (``POSLAKE_METRICS_PORT``; 0 turns
it off) serves ``/metrics`` in the Prometheus text format and ``/healthz``
(200 while the process is healthy, 503 with the reason otherwise; compose's
healthchecks call it). Counters that the processes already keep in their stats
objects are read at scrape time by :class:`StatsCollector`, so the hot paths
do not pay for metrics.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infra.redaction import scrub
from shared.errors import ConfigError

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]


class StatsCollector(Collector):
    """Exposes numbers read at scrape time: ``read()`` -> {name: value}."""

    def __init__(
        self,
        prefix: str,
        read: Callable[[], dict[str, float]],
        counters: dict[str, str],
        gauges: dict[str, str],
    ) -> None:
        self._prefix = prefix
        self._read = read
        self._counters = counters  # name -> help
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        try:
            values = self._read()
        except Exception as exc:  # a scrape must not take the process down
            log.warning("metrics read failed", extra={"error": repr(exc)})
            return
        for name, text in self._counters.items():
            if name in values:
                family = CounterMetricFamily(f"{self._prefix}_{name}", text)
                family.add_metric([], values[name])
                yield family
        for name, text in self._gauges.items():
            if name in values:
                gauge = GaugeMetricFamily(f"{self._prefix}_{name}", text)
                gauge.add_metric([], values[name])
                yield gauge


class LabelledCounter(Collector):
    """One counter family with a label, read at scrape time: ``read()`` -> {label: n}."""

    def __init__(self, name: str, text: str, label: str, read: Callable[[], dict[str, int]]):
        self._name = name
        self._text = text
        self._label = label
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._text, labels=[self._label])
        for value, count in sorted(self._read().items()):
            family.add_metric([value], count)
        yield family


def bind_problem(host: str, port: int, exc: OSError) -> str:
    """Which setting a failed bind is about: the host (no such address) or the port."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"POSLAKE_METRICS_HOST={host}: not an address of this machine ({exc.strerror})"
    return f"POSLAKE_METRICS_PORT={port}: cannot listen on {host}:{port} ({exc.strerror})"


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, health: HealthCheck) -> None:
        self.registry = registry
        self.health = health
        self._server: ThreadingHTTPServer | None = None

    def start(self, host: str, port: int) -> int:
        registry, health = self.registry, self.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self._reply(200, generate_latest(registry), "text/plain; version=0.0.4")
                elif self.path.startswith("/healthz"):
                    healthy, reason = health()
                    # A reason may quote an error, and an error a URL: never a secret.
                    body = scrub(reason).encode()
                    self._reply(200 if healthy else 503, body, "text/plain")
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass  # scrapes every few seconds would flood the log

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(bind_problem(host, port, exc)) from None
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        thread.start()
        bound = int(self._server.server_address[1])
        log.info("metrics endpoint up", extra={"host": host, "port": bound})
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
