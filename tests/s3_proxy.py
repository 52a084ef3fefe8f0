"""An HTTP proxy in front of an S3-compatible store, for the store faults tests need.

It runs as a process of its own (``python -m tests.s3_proxy``): delta-rs holds
the GIL in some calls (``DeltaTable.history``), so a proxy thread inside the
test's process would wait on the very request it has to answer. It forwards
every request as it came (the Host header too: the client's SigV4 signature
covers it) and, while a rule set through its control path says so:

- ``drop_if_none_match``: forwards a PUT without its ``If-None-Match`` header,
  as a store that ignores put-if-absent would (moto 5.0.13 did): a second put
  of a key then overwrites the first. The request is signed again without the
  header, with the store's secret key (``POSLAKE_PROXY_SECRET_KEY``).
- ``fail_after_store``: forwards requests matching a regex (the object is
  stored), then answers 503, or nothing for ``hold_s`` seconds first, as a
  reply lost on the way would look: the client cannot tell that it landed.

Control: ``POST /__proxy/rules`` with a JSON object of rule fields, ``GET
/__proxy/state`` for the rules and what was failed. :class:`S3Proxy` drives it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
_CONTROL = "/__proxy/"
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>the reply was lost on purpose</Message></Error>"
)


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: dict[str, Any] = {
            "drop_if_none_match": False,
            "fail_after_store": None,  # regex over "METHOD /path"
            "fail_times": 0,
            "hold_s": 0.0,
        }
        self.failed: list[str] = []

    def take_failure(self, request: str) -> bool:
        with self.lock:
            pattern = self.rules["fail_after_store"]
            if not pattern or self.rules["fail_times"] <= 0 or not re.search(pattern, request):
                return False
            self.rules["fail_times"] -= 1
            self.failed.append(request)
            return True


def resigned(method: str, path: str, headers: dict[str, str], secret_key: str) -> dict[str, str]:
    """``headers`` with their SigV4 ``Authorization`` computed again for the headers still
    there (a request without a query string, as object PUTs are)."""
    auth = next(v for k, v in headers.items() if k.lower() == "authorization")
    parts = dict(p.strip().split("=", 1) for p in auth.split(" ", 1)[1].split(","))
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    signed = [h for h in parts["SignedHeaders"].split(";") if h in lowered]
    canonical = "\n".join(
        [
            method,
            path.split("?", maxsplit=1)[0],
            "",
            "".join(f"{h}:{lowered[h]}\n" for h in signed),
            ";".join(signed),
            lowered["x-amz-content-sha256"],
        ]
    )
    _access_key, day, region, service, _ = parts["Credential"].split("/")
    scope = f"{day}/{region}/{service}/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = "\n".join(["AWS4-HMAC-SHA256", lowered["x-amz-date"], scope, digest])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    value = (
        f"AWS4-HMAC-SHA256 Credential={parts['Credential']}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return {k: (value if k.lower() == "authorization" else v) for k, v in headers.items()}


def serve(upstream: str, secret_key: str, port: int = 0) -> ThreadingHTTPServer:
    target = urlparse(upstream)
    state = _State()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _control(self, body: bytes) -> None:
            if self.command == "POST":
                with state.lock:
                    state.rules.update(json.loads(body))
            with state.lock:
                reply = {
                    **state.rules,
                    "failed": state.failed,
                }
            self._send(200, [("Content-Type", "application/json")], json.dumps(reply).encode())

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.startswith(_CONTROL):
                self._control(body)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            request = f"{self.command} {self.path.split('?')[0]}"
            if self.command == "PUT" and "If-None-Match" in self.headers:
                with state.lock:
                    drop = bool(state.rules["drop_if_none_match"])
                if drop:
                    headers = {k: v for k, v in headers.items() if k.lower() != "if-none-match"}
                    headers = resigned(self.command, self.path, headers, secret_key)
            connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                reply = connection.getresponse()
                payload = reply.read()
            finally:
                connection.close()
            if reply.status < 300 and state.take_failure(request):
                with state.lock:
                    hold = float(state.rules["hold_s"])
                time.sleep(hold)
                self._send(503, [("Content-Type", "application/xml")], _SLOW_DOWN)
                return
            kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP]
            self._send(reply.status, kept, payload)

        def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                # A HEAD reply's length is the object's, not the (empty) payload's.
                if name.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


class S3Proxy:
    """The proxy process in front of ``upstream``; :meth:`set` changes its rules."""

    def __init__(self, upstream: str, secret_key: str, log: Path | None = None) -> None:
        self._upstream = upstream
        self._secret_key = secret_key
        self._log = log
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Proxy:
        env = {**os.environ, "POSLAKE_PROXY_SECRET_KEY": self._secret_key}
        root = Path(__file__).resolve().parent.parent
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3_proxy", "--upstream", self._upstream],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        return self

    def _call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            connection.request(method, f"{_CONTROL}rules", body=payload)
            reply: dict[str, Any] = json.loads(connection.getresponse().read())
            return reply
        finally:
            connection.close()

    def set(self, **rules: Any) -> dict[str, Any]:
        return self._call("POST", rules)

    def state(self) -> dict[str, Any]:
        return self._call("GET")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = serve(args.upstream, os.environ.get("POSLAKE_PROXY_SECRET_KEY", ""), args.port)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
