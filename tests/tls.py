"""Certificates for TLS tests and benchmarks: a private CA, a server and a client certificate.

Made with the ``openssl`` command line (on every machine that has a TLS build of
redis-server), EC P-256 keys so a whole set takes a few tens of milliseconds.
The server certificate names ``127.0.0.1`` and ``localhost``, so hostname
checking stays on in the tests, as it is by default.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.redis_server import ServerTls

_DAYS = "2"


@dataclass(frozen=True)
class TlsFiles:
    """A CA and the certificates it signed, all PEM files in ``folder``."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server(self, *, mutual: bool) -> ServerTls:
        """The server side: mutual TLS asks every client for a certificate of this CA."""
        return ServerTls(
            ca_file=self.ca_cert,
            cert_file=self.server_cert,
            key_file=self.server_key,
            auth_clients="yes" if mutual else "no",
            client_cert=self.client_cert if mutual else None,
            client_key=self.client_key if mutual else None,
        )


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-400:]}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path), cwd=path.parent)  # fmt: skip


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", _DAYS,
             "-subj", f"/CN=poslake test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    return cert, key


def issue(
    folder: Path, name: str, ca: tuple[Path, Path], *, server: bool, hosts: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A certificate signed by ``ca``: for a server (``hosts`` as subject alt names) or a
    client. Returns (certificate, key)."""
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(request),
             "-subj", f"/CN=poslake test {name}", cwd=folder)  # fmt: skip
    extensions = folder / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
    if server:
        names = ",".join(
            f"IP:{host}" if host.replace(".", "").isdigit() else f"DNS:{host}" for host in hosts
        )
        lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={names}"]
    else:
        lines.append("extendedKeyUsage=clientAuth")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", _DAYS,
             "-extfile", str(extensions), cwd=folder)  # fmt: skip
    request.unlink()
    return cert, key


def make_tls_files(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A CA, a server certificate for ``hosts`` and a client certificate, in ``folder``."""
    ca = make_ca(folder)
    server_cert, server_key = issue(folder, "server", ca, server=True, hosts=hosts)
    client_cert, client_key = issue(folder, "client", ca, server=False)
    return TlsFiles(folder, ca[0], ca[1], server_cert, server_key, client_cert, client_key)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.tls FOLDER [HOST...]``: certificates for a demo (compose.tls.yaml)."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m tests.tls", description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("hosts", nargs="*", default=["redis", "localhost", "127.0.0.1"])
    args = parser.parse_args(argv)
    files = make_tls_files(args.folder, tuple(args.hosts))
    for path in (files.server_key, files.client_key):
        path.chmod(0o644)  # the containers run as other users; a demo, not production
    print(f"CA {files.ca_cert}, server {files.server_cert} for {', '.join(args.hosts)}, "
          f"client {files.client_cert}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
