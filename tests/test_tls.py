"""TLS end to end: a real redis-server speaking only TLS (``--tls-port``, plain TCP off),
certificates made in the test by a private CA, server-only and mutual TLS.

Every process takes the same ``rediss://`` options: the producer (its own RESP
writer) against the gateway simulator, the consumer (``--drain``) and the operator
commands. A certificate that cannot work (another CA, no client certificate where
the server asks for one) stops each of them with one line and exit 6, never a
retry-forever spool, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.publisher import StreamPublisher
from infra.redis_conn import RedisTarget, sync_client
from infra.redis_errors import refusal
from infra.redis_server import RedisServer, ServerTls
from producer.resp import RespConnection
from shared.errors import ExitCode, RedisRefused
from tests.conftest import RedisTarget as ServerTarget
from tests.conftest import start_tls_server, tls_binary
from tests.helpers import (
    REPO_ROOT,
    assert_table_exact,
    consumer_env,
    make_updates,
    run_consumer,
    run_python,
    stream_updates,
)
from tests.producer_harness import producer_settings, running_producer, running_simulator, until
from tests.tls import TlsFiles, issue, make_tls_files

_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Certificates of a CA the servers do not know."""
    return make_tls_files(tmp_path_factory.mktemp("other-ca"))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "poslake", *args], env, timeout=_TIMEOUT_S)


def _assert_one_line_refusal(done: Any, *needles: str) -> None:
    """Exit 6, one line for the operator on stderr (``poslake <program>: ...``) naming
    the cause (log lines may repeat it), no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == ExitCode.REFUSED, output
    assert "Traceback" not in output, output
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("poslake ") and "Redis TLS set-up failed" in line
    ]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _wrong_ca_url(url: str, files: TlsFiles, other: TlsFiles) -> str:
    return url.replace(str(files.ca_cert), str(other.ca_cert))


def test_consumer_and_operator_commands_over_tls(
    redis_tls: ServerTarget, tls_files: TlsFiles, stream: str, lake: Path, tmp_path: Path
) -> None:
    url = redis_tls.url
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    updates = make_updates(300)
    client = sync_client(url)
    try:
        StreamPublisher(client, stream).publish(updates)
        env = consumer_env(url, lake, "tls-1", stream)
        log = tmp_path / "consumer.log"
        assert run_consumer(env, timeout=_TIMEOUT_S, log=log) == 0, log.read_text()
        assert_table_exact(lake, updates)
        assert int(client.xpending(stream, "lake")["pending"]) == 0

        status = _cli(env, "status")
        assert status.returncode == 0, status.stderr
        assert f"stream {stream}: 300 entries" in status.stdout
        assert "group lake: lag 0" in status.stdout and "300 rows" in status.stdout
        dlq = _cli(env, "dlq", "list")
        assert dlq.returncode == 0 and "0 of 0 dead letters shown" in dlq.stdout, dlq.stderr
        replay = _cli(env, "replay", "--beginning", "--yes")
        assert replay.returncode == 0, replay.stderr
        assert "300 entries will be delivered again" in replay.stdout
        # The replayed entries reach the consumer again over TLS; its dedup drops them.
        assert run_consumer(env, timeout=_TIMEOUT_S, log=log) == 0, log.read_text()
        assert_table_exact(lake, updates)
    finally:
        client.close()


def test_producer_publishes_over_tls(
    redis_tls: ServerTarget, stream: str, tmp_path: Path, no_decoder_errors: object
) -> None:
    url = redis_tls.url

    async def scenario() -> None:
        async with running_simulator(accounts=["DU100001"], positions=30, rate=100) as sim:
            settings = producer_settings(url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                # Position updates (the stream carries the options' Greeks too).
                await until(lambda: producer.source.stats.published >= 150)
                assert producer.outbox.connected
                assert await producer.stop()
            assert producer.outbox.stats.spooled == 0

    asyncio.run(scenario())
    client = sync_client(url)
    try:
        published = stream_updates(client, stream)
    finally:
        client.close()
    assert len(published) >= 100
    assert {u.account for u in published} == {"DU100001"}


@pytest.mark.parametrize("explicit_ids", [False, True], ids=["server-ids", "explicit-ids"])
def test_producer_resp_writer_takes_the_url_options(
    redis_tls: ServerTarget, tls_files: TlsFiles, explicit_ids: bool
) -> None:
    """The RESP writer's context is redis-py's: the same URL works for both, and an
    XADD through it reads back through redis-py."""
    target = RedisTarget.parse(redis_tls.url)
    assert target.tls is not None and target.tls.ca_certs == str(tls_files.ca_cert)

    async def xadd() -> object:
        connection = await RespConnection.open(target)
        try:
            entry = b"1-1" if explicit_ids else b"*"
            command = b"*5\r\n$4\r\nXADD\r\n$3\r\ntls\r\n$%d\r\n%s\r\n$1\r\nk\r\n$1\r\nv\r\n" % (
                len(entry),
                entry,
            )
            (reply,) = await connection.execute([command])
            return reply
        finally:
            connection.close()

    reply = asyncio.run(xadd())
    client = sync_client(redis_tls.url)
    try:
        assert client.xrange("tls") == [(reply, {b"k": b"v"})]
    finally:
        client.close()


def test_wrong_ca_stops_every_process_with_one_line(
    redis_tls: ServerTarget,
    tls_files: TlsFiles,
    other_ca: TlsFiles,
    stream: str,
    lake: Path,
    tmp_path: Path,
) -> None:
    url = _wrong_ca_url(redis_tls.url, tls_files, other_ca)
    env = consumer_env(url, lake, "tls-wrong-ca", stream)
    needles = ("certificate is not trusted", "ssl_ca_certs")
    consumer = subprocess.run(
        [sys.executable, "-m", "consumer", "--drain"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    _assert_one_line_refusal(consumer, *needles)
    for args in (("status",), ("dlq", "list"), ("replay", "--beginning", "--yes")):
        _assert_one_line_refusal(_cli(env, *args), *needles)
    producer_env = {
        **env,
        "POSLAKE_IB_PORT": "1",  # never reached: Redis is checked first
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
    }
    producer = subprocess.run(
        [sys.executable, "-m", "producer"],
        env=producer_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    _assert_one_line_refusal(producer, *needles)
    assert not list((tmp_path / "spool").glob("*.spool")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "spool").glob("*.spool")
    )


def test_mutual_tls_without_or_with_a_foreign_client_certificate(
    tmp_path: Path, tls_files: TlsFiles, other_ca: TlsFiles, stream: str, lake: Path
) -> None:
    server = start_tls_server(tmp_path / "redis", tls_files, mutual=True)
    try:
        no_certificate = server.url.split("&ssl_certfile=")[0]
        foreign = server.url.replace(str(tls_files.client_cert), str(other_ca.client_cert))
        foreign = foreign.replace(str(tls_files.client_key), str(other_ca.client_key))
        for url, needle in (
            (no_certificate, "asks for a client certificate"),
            (foreign, "refused our client certificate"),
        ):

            async def open_writer(address: str = url) -> None:
                await RespConnection.open(RedisTarget.parse(address))

            with pytest.raises(RedisRefused, match=needle):
                asyncio.run(open_writer())
            env = consumer_env(url, lake, "tls-mutual", stream)
            consumer = subprocess.run(
                [sys.executable, "-m", "consumer", "--drain"],
                env=env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
            _assert_one_line_refusal(consumer, "ssl_certfile")
            _assert_one_line_refusal(_cli(env, "status"), "ssl_certfile")
            producer_env = {
                **env,
                "POSLAKE_IB_PORT": "1",
                "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
            }
            producer = subprocess.run(
                [sys.executable, "-m", "producer"],
                env=producer_env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
            _assert_one_line_refusal(producer, "ssl_certfile")
    finally:
        server.stop()


def test_a_missing_certificate_file_is_a_bad_setting(tmp_path: Path, lake: Path) -> None:
    env = consumer_env(
        f"rediss://127.0.0.1:1/0?ssl_ca_certs={tmp_path / 'nope.pem'}", lake, "x", "positions"
    )
    done = _cli(env, "status")
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert "POSLAKE_REDIS_URL" in done.stderr and "ssl_ca_certs" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.fspath(tmp_path) not in done.stdout


def test_every_url_option_means_the_same_to_redis_py_and_the_resp_writer(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """Host-name checking, verification off, system CAs only: both clients agree."""

    binary = tls_binary()
    if binary is None:
        pytest.skip("needs a redis-server built with TLS")
    # A certificate for another host name than the 127.0.0.1 the URL names.
    cert, key = issue(
        tmp_path, "elsewhere", (tls_files.ca_cert, tls_files.ca_key), server=True,
        hosts=("redis.example",),
    )  # fmt: skip
    server = RedisServer(binary, tmp_path / "redis", tls=ServerTls(tls_files.ca_cert, cert, key))
    server.start()
    base = f"rediss://127.0.0.1:{server.port}/0"
    ca = f"ssl_ca_certs={tls_files.ca_cert}"
    cases = {
        f"{base}?{ca}": "not trusted",  # the name does not match
        f"{base}?{ca}&ssl_check_hostname=false": None,
        f"{base}?ssl_cert_reqs=none": None,  # no verification at all
        f"{base}?ssl_cert_reqs=required": "not trusted",  # the system's CAs only
        f"{base}?{ca}&ssl_cert_reqs=optional&ssl_check_hostname=false": None,
    }
    try:
        for url, failure in cases.items():
            outcomes: list[str | None] = []
            client = sync_client(url, socket_connect_timeout=5)
            try:
                client.ping()
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(str(refusal(exc)))
            finally:
                client.close()

            async def ping(address: str = url) -> None:
                connection = await RespConnection.open(RedisTarget.parse(address))
                connection.close()

            try:
                asyncio.run(ping())
                outcomes.append(None)
            except RedisRefused as exc:
                outcomes.append(str(exc))
            if failure is None:
                assert outcomes == [None, None], (url, outcomes)
            else:
                assert all(o is not None and failure in o for o in outcomes), (url, outcomes)
                assert outcomes[0] == outcomes[1], "the same words from both clients"
    finally:
        server.stop()
