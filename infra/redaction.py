"""Secrets are never shown: the one scrubber every message and log line passes through.

What is secret:

- the password of ``POSLAKE_REDIS_URL`` (and of a lake URI with credentials);
- the value of every ``POSLAKE_STORAGE_OPTIONS`` entry, except the options in
  :data:`PUBLIC_STORAGE_OPTIONS`, which say where and how to connect (endpoint,
  region, timeouts...) and are what an operator needs to read in an error;
- the credentials of any URL in any text (``scheme://user:password@host``).

Redaction happens at the source (only :func:`infra.redis_conn.redacted_url`
of a URL is ever formatted into a message), and once more where text leaves
the process: the log formatters (infra/logs.py), the operator commands' error
lines (poslake/cli.py), ``poslake run``'s output, and the exception hooks that
print tracebacks (:func:`install`). That second pass is what catches errors
from libraries that quote a URL or an option value (redis-py, delta-rs).

A secret of 8 characters or more is masked wherever it occurs; a shorter one
only where it stands alone (not inside a longer word), so a password ``pass``
does not garble the word "password" in a message.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
LONG_SECRET_CHARS = 8

# Storage options whose values are not secret, by name without the aws_/azure_/
# google_ prefix, lower case (delta-rs and object_store accept either case).
PUBLIC_STORAGE_OPTIONS = frozenset(
    {
        "region",
        "default_region",
        "endpoint",
        "endpoint_url",
        "allow_http",
        "allow_invalid_certificates",
        "virtual_hosted_style_request",
        "bucket",
        "bucket_name",
        "s3_express",
        "conditional_put",
        "copy_if_not_exists",
        "s3_locking_provider",
        "unsigned_payload",
        "skip_signature",
        "checksum_algorithm",
        "imdsv1_fallback",
        "disable_tagging",
        "request_payer",
        "server_side_encryption",
        "timeout",
        "connect_timeout",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "http1_only",
        "http2_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "max_retries",
        "retry_timeout",
        "user_agent",
        "default_content_type",
        "account_name",
        "container_name",
        "use_emulator",
        "use_fabric_endpoint",
        "use_azure_cli",
        "randomize_addresses",
    }
)
_OPTION_PREFIXES = ("aws_", "azure_storage_", "azure_", "google_")

# scheme://user:password@host -> scheme://user:***@host. A user without a password
# stays (an Azure container@account is no credential).
_URL_CREDENTIALS = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*):(?P<password>[^\s/?#]*)@"
)
# key=value credentials in query strings (a SAS signature, a token).
_QUERY_CREDENTIALS = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|secret|token|sig|signature|access_key|"
    r"secret_key|client_secret|sas|sas_key)=)(?P<value>[^&\s\"']+)",
    re.IGNORECASE,
)


def is_public_option(name: str) -> bool:
    """Whether a storage option's value may be shown (it configures, it does not prove)."""
    key = name.lower()
    for prefix in _OPTION_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key in PUBLIC_STORAGE_OPTIONS


def url_password(url: str) -> str | None:
    """The password in ``url``, if it has one (``None`` for an unparseable URL too)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        match = _URL_CREDENTIALS.search(url)
        return unquote(match.group("password")) if match else None
    return unquote(password) if password else None


def secrets_of(
    redis_url: str | None,
    storage_options: Mapping[str, object] | None = None,
    lake_uri: str | None = None,
) -> list[str]:
    """The secret strings of a configuration: URL passwords, secret option values."""
    found: list[str] = []
    for url in (redis_url, lake_uri):
        password = url_password(url) if url else None
        if password:
            found.append(password)
    for name, value in (storage_options or {}).items():
        if not is_public_option(str(name)) and value is not None:
            # A value of the wrong type (a key given as a number) is still a secret.
            text = value if isinstance(value, str) else json.dumps(value)
            if text:
                found.append(text)
    return found


class Redactor:
    """Masks known secrets and URL credentials in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            # The ways a library may spell it: as is, percent-encoded (in a URL),
            # escaped by repr() or JSON.
            forms.update(
                {secret, quote(secret, safe=""), quote(secret), repr(secret)[1:-1]}
                | {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
            )
        parts = []
        for form in sorted(forms, key=len, reverse=True):
            escaped = re.escape(form)
            if len(form) >= LONG_SECRET_CHARS:
                parts.append(escaped)
            else:
                parts.append(rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])")
        self._secrets = re.compile("|".join(parts)) if parts else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        text = _URL_CREDENTIALS.sub(rf"\g<head>:{MASK}@", text)
        return _QUERY_CREDENTIALS.sub(rf"\g<head>{MASK}", text)


class _Active:
    """The process's redactor (one per process: its secrets come from its settings)."""

    redactor = Redactor()
    lock = threading.Lock()


def install(secrets: Iterable[str]) -> Redactor:
    """Make ``secrets`` the ones :func:`scrub` masks, and scrub printed tracebacks.

    Called by :func:`shared.settings.load_settings_or_report`, i.e. by every
    entry point once its settings are known.
    """
    redactor = Redactor(secrets)
    with _Active.lock:
        _Active.redactor = redactor
        sys.excepthook = _excepthook
        threading.excepthook = _thread_excepthook
    return redactor


def scrub(text: str) -> str:
    """``text`` with every known secret and URL credential masked."""
    return _Active.redactor(text)


def scrub_value(value: object) -> object:
    """A log field or JSON value with its strings scrubbed (containers too)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {str(scrub_value(k)): scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub_value(v) for v in value]
    return scrub(str(value))


def _excepthook(
    kind: type[BaseException], value: BaseException, trace: TracebackType | None
) -> None:
    text = "".join(traceback.format_exception(kind, value, trace))
    sys.stderr.write(scrub(text))
    sys.stderr.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(scrub(f"Exception in thread {name}:\n{text}"))
    sys.stderr.flush()
