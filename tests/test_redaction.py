"""The scrubber (infra/redaction.py) and the log formatters that use it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from infra import redaction
from infra.logs import JsonFormatter, TextFormatter
from infra.redaction import MASK, Redactor, is_public_option, secrets_of
from shared.settings import load_settings
from tests.helpers import REPO_ROOT

PASSWORD = "canary-PW:7@x/Q"
SECRET_KEY = "canary-SK/+=z9"


@pytest.fixture
def installed() -> Iterator[None]:
    hooks = sys.excepthook
    redaction.install(
        secrets_of(
            f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:6390/0",
            {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"},
        )
    )
    try:
        yield
    finally:
        redaction.install(())
        sys.excepthook = hooks


def test_secrets_of_takes_url_passwords_and_secret_options_only() -> None:
    found = secrets_of(
        f"redis://user:{quote(PASSWORD, safe='')}@h:1/0",
        {
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "aws_access_key_id": "AKIDCANARY",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "timeout": "2s",
            "azure_storage_account_key": 12345678901,  # wrong type: still secret
        },
        "s3://bucket/lake",
    )
    assert sorted(found) == sorted([PASSWORD, SECRET_KEY, "AKIDCANARY", "12345678901"])
    assert is_public_option("aws_region") and is_public_option("ALLOW_HTTP")
    assert not is_public_option("AWS_SESSION_TOKEN") and not is_public_option("sas_key")


def test_every_spelling_of_a_secret_is_masked() -> None:
    scrub = Redactor([PASSWORD, SECRET_KEY])
    for text in (
        PASSWORD,
        quote(PASSWORD, safe=""),
        repr(PASSWORD),
        json.dumps(PASSWORD),
        f"AUTH failed with {SECRET_KEY!r} for key",
        json.dumps({"k": SECRET_KEY}),
    ):
        cleaned = scrub(text)
        assert "canary" not in cleaned, (text, cleaned)
        assert MASK in cleaned


def test_url_credentials_are_masked_without_knowing_them() -> None:
    scrub = Redactor()
    assert scrub("at redis://bob:hunter2@10.0.0.1:6379/0 now") == (
        f"at redis://bob:{MASK}@10.0.0.1:6379/0 now"
    )
    assert scrub("rediss://:p%40ss@host/1") == f"rediss://:{MASK}@host/1"
    assert scrub("GET https://acct.blob/c?sv=1&sig=abcDEF123&x=1") == (
        f"GET https://acct.blob/c?sv=1&sig={MASK}&x=1"
    )
    # No credentials: left alone (a port, an Azure container@account).
    for text in ("http://127.0.0.1:9000/bucket", "abfss://data@acct.dfs.core.windows.net/x"):
        assert scrub(text) == text


def test_a_short_secret_is_masked_only_as_a_whole_word() -> None:
    scrub = Redactor(["pass"])
    assert scrub("check the password; it was pass") == "check the password; it was ***"


def test_both_log_formats_mask_message_fields_and_traceback(installed: None) -> None:
    try:
        raise RuntimeError(f"boom at redis://:{PASSWORD}@h/0")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "failed with %s", (SECRET_KEY,), exc_info
    )
    record.error = f"options {{'AWS_SECRET_ACCESS_KEY': '{SECRET_KEY}'}}"
    record.nested = {"password": PASSWORD, "list": [SECRET_KEY]}
    text = TextFormatter("%(levelname)s %(message)s").format(record)
    as_json = JsonFormatter().format(record)
    for line in (text, as_json):
        assert "canary" not in line, line
        assert MASK in line
    assert json.loads(as_json)["nested"]["list"] == [MASK]


def test_uncaught_tracebacks_are_masked() -> None:
    """The exception hooks that an entry point installs with its settings."""
    code = (
        "import threading; from infra import redaction\n"
        f"redaction.install([{SECRET_KEY!r}])\n"
        f"t = threading.Thread(target=lambda: 1 / 0 if False else (_ for _ in ()).throw("
        f"ValueError({SECRET_KEY!r})))\n"
        "t.start(); t.join()\n"
        f"raise RuntimeError({SECRET_KEY!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError" in done.stderr
    assert "RuntimeError: ***" in done.stderr
    assert "canary" not in done.stderr


def test_settings_repr_holds_no_secret() -> None:
    settings = load_settings(
        redis_url=f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:6390/0",
        storage_options={"AWS_SECRET_ACCESS_KEY": SECRET_KEY},
    )
    assert "canary" not in repr(settings) and "canary" not in str(settings)
    assert settings.redis_url_redacted == "redis://:***@127.0.0.1:6390/0"
