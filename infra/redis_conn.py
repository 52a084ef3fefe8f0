"""Where Redis is and how to talk to it: the one parser of ``POSLAKE_REDIS_URL``.

Every process (consumer, producer, operator commands) connects through
:func:`sync_client`, :func:`async_client` or, for the producer's own RESP
writer, :class:`RedisTarget`, so one URL means the same thing everywhere:

- ``redis://[user[:password]@]host[:port][/db]``, ``rediss://...`` for TLS,
  ``unix://[user[:password]@]/path/to/socket[?db=N]``;
- ``redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/<master>[/db]``
  (``rediss+sentinel://`` for TLS to the sentinels and the nodes): the master of
  that name as the sentinels name it (port 26379 unless given), asked again on
  every new connection, so a client follows a failover by itself. The
  credentials are the data nodes'; the sentinels are asked without;
- query options (TLS): ``ssl_ca_certs`` (CA bundle file), ``ssl_ca_path`` (CA
  folder), ``ssl_cert_reqs`` (``required``, the default, ``optional`` or
  ``none``), ``ssl_check_hostname`` (``true`` unless ``ssl_cert_reqs=none``),
  ``ssl_certfile`` and ``ssl_keyfile`` (a client certificate, for mutual TLS);
  and ``db``.

The URL is checked once, at start (a bad port, database or option stops the
program naming ``POSLAKE_REDIS_URL``), and only :func:`redacted_url` of it is
ever shown: the password never appears in output, logs or errors.
"""

from __future__ import annotations

import os
import select
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry as aioretry
import redis.connection
import redis.retry
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff

CertReqs = Literal["none", "optional", "required"]
_CERT_REQS: dict[str, ssl.VerifyMode] = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
QUERY_OPTIONS = frozenset({"db", "ssl_cert_reqs", "ssl_check_hostname", *_TLS_FILE_OPTIONS})
URL_SETTING = "POSLAKE_REDIS_URL"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The ``rediss://`` options, with redis-py's meaning."""

    ca_certs: str | None = None
    ca_path: str | None = None
    cert_reqs: CertReqs = "required"
    check_hostname: bool = True
    certfile: str | None = None
    keyfile: str | None = None

    def context(self) -> ssl.SSLContext:
        """An SSL context for a client connection, built as redis-py builds its own:
        the system's CAs plus ``ca_certs``/``ca_path``, then the client certificate."""
        context = ssl.create_default_context()
        context.check_hostname = self.check_hostname and self.cert_reqs != "none"
        context.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.certfile is not None:
            context.load_cert_chain(self.certfile, self.keyfile)
        if self.ca_certs is not None or self.ca_path is not None:
            context.load_verify_locations(cafile=self.ca_certs, capath=self.ca_path)
        return context

    def check(self) -> None:
        """Read every file once (settings do, at start), so a missing or bad one stops the
        program naming the option (``ValueError``) instead of failing every connection."""
        files = (
            ("ssl_ca_certs", self.ca_certs),
            ("ssl_certfile", self.certfile),
            ("ssl_keyfile", self.keyfile),
        )
        for option, path in files:
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{option}: no such file {path!r}")
        if self.ca_path is not None and not os.path.isdir(self.ca_path):
            raise ValueError(f"ssl_ca_path: no such folder {self.ca_path!r}")
        context = ssl.create_default_context()
        try:
            if self.ca_certs is not None or self.ca_path is not None:
                context.load_verify_locations(cafile=self.ca_certs, capath=self.ca_path)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ssl_ca_certs: cannot be loaded ({_reason(exc)})") from None
        try:
            if self.certfile is not None:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as exc:
            reason = _reason(exc)
            raise ValueError(f"ssl_certfile/ssl_keyfile: cannot be loaded ({reason})") from None


def _reason(exc: OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc).lower().replace("_", " ")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed, checked ``POSLAKE_REDIS_URL``. ``repr`` never shows the password."""

    url: str = field(repr=False)
    host: str | None
    port: int
    path: str | None  # a Unix socket
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: TlsOptions | None
    # Through Sentinel: the sentinels' addresses and the master's name (host/port unused).
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Parse and check ``url``; ``ValueError`` says what is wrong, never the password."""
        if url.partition("://")[0].lower() in _SENTINEL_SCHEMES:
            return cls._parse_sentinel(url)
        try:
            parts = urlsplit(url)
            port_number = parts.port
        except ValueError:
            # urlsplit's own message may quote the netloc, credentials included.
            raise ValueError("the port must be a number from 1 to 65535") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+sentinel:// or "
                "rediss+sentinel://"
            )
        query = _query_options(parts.query)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        db = _database(parts.path if scheme != "unix" else "", query.get("db"))
        tls = _tls_options(query) if scheme == "rediss" else None
        if scheme != "rediss" and any(name.startswith("ssl_") for name in query):
            raise ValueError("ssl_* options need a rediss:// URL")
        if scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs the socket's path")
            return cls(url, None, 0, unquote(parts.path), db, username, password, None)
        if port_number is not None and not 1 <= port_number <= 65535:
            raise ValueError("the port must be a number from 1 to 65535")
        host = unquote(parts.hostname) if parts.hostname else "127.0.0.1"
        return cls(url, host, port_number or 6379, None, db, username, password, tls)

    @classmethod
    def _parse_sentinel(cls, url: str) -> RedisTarget:
        try:
            parts = urlsplit(url)
        except ValueError:  # its message may quote the netloc, credentials included
            raise ValueError(
                "the sentinel hosts must be host[:port] or [IPv6 address][:port], by commas"
            ) from None
        tls_scheme = parts.scheme.lower() == "rediss+sentinel"
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        sentinels = tuple(_host_port(each, 26379) for each in hosts.split(",") if each)
        if not sentinels:
            raise ValueError("a redis+sentinel:// URL needs at least one sentinel host")
        names = [unquote(part) for part in parts.path.split("/") if part]
        if not names:
            raise ValueError("a redis+sentinel:// URL needs the master's name: .../<master>[/db]")
        if len(names) > 2:
            raise ValueError("the path of a redis+sentinel:// URL is /<master>[/db]")
        query = _query_options(parts.query)
        db = _database(names[1] if len(names) == 2 else "", query.get("db"))
        tls = _tls_options(query) if tls_scheme else None
        if not tls_scheme and any(name.startswith("ssl_") for name in query):
            raise ValueError("ssl_* options need a rediss+sentinel:// URL")
        first_host, first_port = sentinels[0]
        return cls(
            url, first_host, first_port, None, db, username, password, tls, sentinels, names[0]
        )

    @property
    def redacted(self) -> str:
        """The URL with its password replaced by ``***``: the only form ever shown."""
        return redacted_url(self.url)

    @property
    def where(self) -> str:
        """``host:port``, the socket path, or the master's name and its sentinels."""
        if self.master_name is not None:
            via = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"master {self.master_name!r} via sentinels {via}"
        return self.path if self.path is not None else f"{self.host}:{self.port}"


_SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})


def _query_options(text: str) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, values in parse_qs(text, keep_blank_values=True).items():
        if name not in QUERY_OPTIONS:
            raise ValueError(
                f"unknown URL option {name!r} (known: {', '.join(sorted(QUERY_OPTIONS))})"
            )
        query[name] = values[-1]
    return query


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("a bracketed sentinel host must be [address] or [address]:port")
        host, port = inside, rest[1:]
    elif text.count(":") > 1:
        raise ValueError("an IPv6 sentinel host must be in brackets: [address]:port")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError("a sentinel host is empty")
    if not port:
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port)


def _database(path: str, from_query: str | None) -> int:
    text = from_query if from_query is not None else path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"the database must be a number, not {text!r}")
    return int(text)


def _tls_options(query: dict[str, str]) -> TlsOptions:
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs must be none, optional or required")
    check = query.get("ssl_check_hostname")
    if check is None:
        check_hostname = reqs != "none"
    elif check.lower() in _TRUE:
        check_hostname = True
    elif check.lower() in _FALSE:
        check_hostname = False
    else:
        raise ValueError("ssl_check_hostname must be true or false")
    files = {name: query.get(name) or None for name in _TLS_FILE_OPTIONS}
    if files["ssl_keyfile"] and not files["ssl_certfile"]:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    options = TlsOptions(
        ca_certs=files["ssl_ca_certs"],
        ca_path=files["ssl_ca_path"],
        cert_reqs=reqs,  # type: ignore[arg-type]
        check_hostname=check_hostname,
        certfile=files["ssl_certfile"],
        keyfile=files["ssl_keyfile"],
    )
    return options


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS set-up failed for good (a certificate not trusted, a client certificate
    missing or refused, no TLS on the port), or ``None`` when ``exc`` is not such a
    failure. An unexpected end of the stream (``SSLEOFError``) is not: a server killed
    mid-connection ends it the same way."""
    for link in _chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            return (
                f"the server's certificate is not trusted ({link.verify_message}): check "
                f"ssl_ca_certs or ssl_ca_path (the CA that signed it) and the host name in "
                f"{URL_SETTING}"
            )
        if type(link) is ssl.SSLError:  # the subclasses are EOF, syscall, want-read...
            reason = str(link.reason or "")
            if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
                return (
                    "the server asks for a client certificate (tls-auth-clients yes): set "
                    f"ssl_certfile and ssl_keyfile in {URL_SETTING}"
                )
            if "ALERT" in reason:
                return (
                    f"the server refused our client certificate ({reason.lower()}): check "
                    f"ssl_certfile and ssl_keyfile in {URL_SETTING} (signed by a CA the "
                    "server trusts, not expired)"
                )
            if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
                return f"the server does not speak TLS on this port: check {URL_SETTING}"
            return f"TLS failed ({reason or link}): check the ssl_* options of {URL_SETTING}"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (redis-py raises its own errors inside ``except``)."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(seen) < 8 and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen


def redacted_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``; safe for any string."""
    try:
        parts = urlsplit(url)
        password = parts.password
        username = parts.username
    except ValueError:
        return "<unparseable Redis URL>"
    if password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(unquote(username), safe="") if username else ""
    credentials = f"{user}:***" if password is not None else user
    return urlunsplit((parts.scheme, f"{credentials}@{host}", parts.path, parts.query, ""))


def _client_options(target: RedisTarget, *, address: bool = True) -> dict[str, Any]:
    """redis-py's connection options for ``target`` (``address``: host and port too)."""
    options: dict[str, Any] = {"db": target.db}
    if target.username is not None:
        options["username"] = target.username
    if target.password is not None:
        options["password"] = target.password
    if target.path is not None:
        options["unix_socket_path"] = target.path
        return options
    if address:
        options["host"] = target.host
        options["port"] = target.port
    if target.tls is not None:
        tls = target.tls
        options.update(
            ssl=True,
            ssl_ca_certs=tls.ca_certs,
            ssl_ca_path=tls.ca_path,
            ssl_cert_reqs=tls.cert_reqs,
            ssl_check_hostname=tls.check_hostname and tls.cert_reqs != "none",
            ssl_certfile=tls.certfile,
            ssl_keyfile=tls.keyfile,
        )
    return options


def _retryable(exc: Exception, also: Callable[[Exception], bool] | None) -> bool:
    return tls_failure(exc) is None and (also is None or also(exc))


class _Retry(redis.retry.Retry):
    """redis-py's connection retry (same defaults), minus TLS set-ups that cannot succeed."""

    def call_with_retry(
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        return super().call_with_retry(
            do, fail, lambda exc: _retryable(exc, is_retryable), with_failure_count
        )


class _AsyncRetry(aioretry.Retry):
    async def call_with_retry(
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        return await super().call_with_retry(
            do, fail, lambda exc: _retryable(exc, is_retryable), with_failure_count
        )


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.01, cap=1)  # redis-py's default


TLS_VERDICT_WAIT_S = 0.25


def await_tls_verdict(sock: ssl.SSLSocket, timeout_s: float = TLS_VERDICT_WAIT_S) -> None:
    """After a TLS 1.3 handshake, wait until the server accepts the connection (its session
    tickets arrive) or refuses our certificate (its alert arrives, raised here).

    In TLS 1.3 the server judges the client's certificate after the client's handshake
    is done; a command written at once races the server's close, and the reset that
    follows drops the alert: the failure would look like a lost connection. Waiting
    for the verdict (a millisecond on a LAN) makes it the clear one. A server that
    sends no tickets costs ``timeout_s`` per connection."""
    if sock.version() != "TLSv1.3":
        return  # TLS 1.2 judges the certificate inside the handshake
    previous = sock.gettimeout()
    deadline = time.monotonic() + timeout_s
    sock.setblocking(False)
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                return
            try:
                sock.recv(1)  # Redis sends nothing before a command: only TLS records
                return
            except ssl.SSLWantReadError:
                session = sock.session
                if session is not None and session.has_ticket:
                    return  # accepted
    finally:
        sock.settimeout(previous)


class _TlsConnection(redis.connection.SSLConnection):
    """redis-py's TLS connection, which hears a refused client certificate as such."""

    def _connect(self) -> Any:
        sock = super()._connect()  # type: ignore[no-untyped-call]
        try:
            await_tls_verdict(sock)
        except BaseException:
            sock.close()
            raise
        return sock


def sync_client(
    target: RedisTarget | str, client_class: type[redis.Redis] = redis.Redis, **options: Any
) -> redis.Redis:
    """A redis-py client (of ``client_class``) for ``target``; ``options`` add timeouts."""
    target = target if isinstance(target, RedisTarget) else RedisTarget.parse(target)
    options.setdefault("retry", _Retry(_backoff(), 10))
    if target.master_name is not None:
        return _sentinel_master(target, client_class, options)
    client = client_class(**_client_options(target), **options)
    if target.tls is not None:
        client.connection_pool.connection_class = _TlsConnection  # no connection made yet
    return client


def _sentinel_master(
    target: RedisTarget, client_class: type[redis.Redis], options: dict[str, Any]
) -> redis.Redis:
    """A client of the master the sentinels name, found again on every new connection
    (redis-py's SentinelConnectionPool: a demoted master's READONLY reply and a lost
    connection both make it ask the sentinels again)."""
    timeouts: dict[str, Any] = {
        k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options
    }
    nodes = _client_options(target, address=False)
    sentinel = redis.sentinel.Sentinel(
        list(target.sentinels),
        # The sentinels: the nodes' TLS options, not their credentials.
        sentinel_kwargs={**{k: v for k, v in nodes.items() if k.startswith("ssl")}, **timeouts},
        **nodes,
    )
    assert target.master_name is not None
    client: redis.Redis = sentinel.master_for(
        target.master_name, redis_class=client_class, **options
    )
    return client


def async_client(target: RedisTarget | str, **options: Any) -> aioredis.Redis:
    """An asyncio redis-py client for ``target`` (not through Sentinel: no caller needs it)."""
    target = target if isinstance(target, RedisTarget) else RedisTarget.parse(target)
    if target.master_name is not None:
        raise ValueError("async_client does not reach a master through Sentinel")
    options.setdefault("retry", _AsyncRetry(_backoff(), 10))
    return aioredis.Redis(**_client_options(target), **options)


def check_transactions(client: redis.Redis) -> None:
    """An empty MULTI/EXEC on one connection: raises if either is refused.

    Check before relying on a transaction: a refused MULTI does not stop a
    pipeline, Redis runs the commands queued after it one by one, so the
    transaction would not be atomic (redis-py reports only the EXEC without MULTI).
    """
    probe: Any = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        probe.execute_command("MULTI")
        probe.execute_command("EXEC")
    finally:
        probe.close()
