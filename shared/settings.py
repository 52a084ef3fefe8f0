"""Settings: one typed model, read from ``POSLAKE_*`` environment variables once at start.

Only the entry points call :func:`load_settings`; everything else gets the
:class:`Settings` object passed in. A wrong value stops the program with a
message that names the environment variable.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from infra import redaction
from infra.redis_conn import RedisTarget, redacted_url
from shared import lake_names
from shared.errors import ConfigError

DEFAULT_HISTORY_RETENTION_HOURS = 6.0
# Tombstones and log files outlive the history by this much (shared/table.py), so that
# the consumers' vacuum (at most hourly) always sees a retired file's tombstone before
# it expires.
TOMBSTONE_MARGIN_HOURS = 2

ENV_PREFIX = "POSLAKE_"

# after_commit: after the history commit, before the positions_current merge;
# after_close: after a complete snapshot's closing rows are appended, before their merge;
# after_current: after all of them, before the XACK.
CrashPoint = Literal["after_read", "after_commit", "after_close", "after_current", "mid_claim"]

# Longest wait any setting may ask for: a day is already absurd for a backoff, and
# it keeps every duration far from what time.sleep() and timers overflow on.
MAX_SECONDS = 86_400.0
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
SecondsOrZero = Annotated[float, Field(ge=0, le=MAX_SECONDS)]

# Where a lake can live: a local folder (a path or file://) or a store delta-rs reaches.
LAKE_SCHEMES = frozenset({"file", "s3", "s3a", "gs", "az", "abfs", "abfss", "adl", "memory"})

# POSLAKE_ variables that are read by the test suite, not by the programs.
NOT_SETTINGS = frozenset({"POSLAKE_TEST_REDIS_URL"})

# Settings whose values are secret or may hold a secret: never echoed in an error.
_SECRET_FIELDS = frozenset({"redis_url", "storage_options", "lake_uri"})


def _default_consumer_name() -> str:
    # Stable per host, so a restarted consumer finds its own pending entries.
    return f"consumer-{socket.gethostname()}"


class Settings(BaseSettings):
    """Everything the producer and consumer can be told, with defaults that run locally."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,  # "inf" or "nan" as a duration is a typo, not a wish
    )

    # Redis Stream and consumer group.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)  # secret
    stream: Annotated[str, Field(min_length=1)] = "positions"
    group: Annotated[str, Field(min_length=1)] = "lake"
    consumer_name: Annotated[str, Field(min_length=1)] = Field(
        default_factory=_default_consumer_name
    )

    # Delta Lake.
    lake_uri: Annotated[str, Field(min_length=1)] = "./lake"
    # delta-rs storage options (S3 keys, endpoint...): JSON object of strings, secret.
    storage_options: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, repr=False)

    # Batching: a batch closes at this many entries or this long after its first entry.
    batch_max_entries: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    batch_max_wait_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    read_count: Annotated[int, Field(ge=1, le=100_000)] = 2_000

    # Recovery of other consumers' entries and poison handling.
    claim_min_idle_s: SecondsOrZero = 60.0
    claim_interval_s: Seconds = 15.0
    claim_page_size: Annotated[int, Field(ge=1, le=100_000)] = 1_000
    max_deliveries: Annotated[int, Field(ge=1)] = 10

    # Hostile input bounds (consumer): an entry bigger than this (field names and
    # values) is dead-lettered undecoded, and its dead letter truncated; a batch also
    # closes once its entries hold this many bytes.
    max_entry_bytes: Annotated[int, Field(ge=1_024, le=64 * 1024 * 1024)] = 65_536
    batch_max_bytes: Annotated[int, Field(ge=65_536, le=4 * 1024 * 1024 * 1024)] = 64 * 1024 * 1024

    # Retry backoff for Redis reconnects and failed Delta commits.
    retry_initial_s: Seconds = 0.2
    retry_max_s: Seconds = 30.0

    # Dedup index: keys kept in memory before the oldest are dropped (older ones
    # are then checked against the table instead).
    dedup_index_max_keys: Annotated[int, Field(ge=1_000)] = 2_000_000

    # Table upkeep done by the consumer itself.
    compact_min_small_files: Annotated[int, Field(ge=2)] = 32
    # Compaction packs every file under the target into target-sized files, so the
    # target bounds what one compaction rewrites per partition; bigger files (from
    # `poslake maintain`-style compactions) are left alone.
    compact_small_file_bytes: Annotated[int, Field(ge=1)] = 4 * 1024 * 1024
    compact_target_file_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    maintenance_every_commits: Annotated[int, Field(ge=1)] = 25
    checkpoint_interval: Annotated[int, Field(ge=1)] = 100
    # Vacuum of files retired longer ago than the history: at most hourly, because a
    # tombstone outlives the history by only TOMBSTONE_MARGIN_HOURS.
    vacuum_interval_s: Annotated[float, Field(ge=60, le=3600)] = 3600.0

    # Consumers trim the stream below what every group acknowledged (consumer/trim.py),
    # keeping a replay window within a memory cap.
    stream_retention_s: Annotated[float, Field(ge=0, le=365 * MAX_SECONDS)] = 86_400.0
    stream_max_bytes: Annotated[int, Field(ge=1_048_576)] = 256 * 1024 * 1024
    stream_trim_interval_s: Annotated[float, Field(ge=1, le=60)] = 30.0
    dlq_max_entries: Annotated[int, Field(ge=1)] = 100_000

    # Producer side: optional approximate trimming of the stream on XADD.
    stream_maxlen: Annotated[int, Field(ge=1)] | None = None
    stream_min_age_s: Annotated[float, Field(gt=0, le=365 * MAX_SECONDS)] | None = None
    publish_chunk: Annotated[int, Field(ge=1, le=100_000)] = 500

    # Producer: the IB connection (TWS or IB Gateway; the API is plain TCP).
    ib_host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    ib_port: Annotated[int, Field(ge=1, le=65535)] = 4002
    ib_client_id: Annotated[int, Field(ge=0, le=2**31 - 1)] = 17
    # Accounts to publish (comma-separated); empty: every account of the login. The
    # first one gets IB's portfolio stream; the others positions + PnL-single.
    ib_accounts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # ``poslake reconcile``'s own client ID on the producer's gateway (read-only).
    reconcile_client_id: Annotated[int, Field(ge=0, le=2**31 - 1)] = 18
    ib_connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    ib_reconnect_initial_s: Seconds = 1.0
    ib_reconnect_max_s: Seconds = 60.0
    ib_client_id_backoff_s: SecondsOrZero = 15.0
    # After this long with nothing from IB, ask for the current time to check liveness.
    ib_idle_probe_s: Seconds = 60.0
    # Decode portfolio/position/PnL messages straight into updates (see producer/ib_source.py).
    ib_fast_decode: bool = True
    # The zone TWS/Gateway is set to: it reads execution times IB sends without a zone
    # (an IANA name such as America/New_York; times in IB's UTC form or with a zone
    # need nothing). Never the machine's zone (producer/ib_time.py).
    ib_timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    # PnL-single subscriptions of the positions-only accounts: requests (subscribe or
    # cancel) per second, under ib_async's throttle of 45/s that every request shares;
    # how long a closed position keeps its subscription in case it reopens; how many
    # are held at most (past that, closed ones are cancelled first).
    ib_pnl_requests_per_s: Annotated[int, Field(ge=1, le=40)] = 20
    ib_pnl_cancel_grace_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    ib_pnl_max_subscriptions: Annotated[int, Field(ge=1)] = 10_000
    # Option Greeks (producer/greeks.py): a market-data line per option position within
    # `ib_greeks_lines` (IB allows 100 by default; other sessions of the login use lines
    # too); past it, snapshots in rotation give every option a fresh sample at least every
    # `ib_greeks_rotation_s`. Requests (subscribe, cancel, snapshot) per second share
    # ib_async's 45/s with the PnL-single ones. A row per contract and tick at least every
    # `ib_greeks_sample_s` while IB sends, sooner when a value moved by more than
    # `ib_greeks_tolerance` (relative), never more often than `ib_greeks_min_interval_s`.
    # Market data type asked for first, and where live data is not permitted the one to
    # fall back to (3 delayed, 4 delayed frozen: the last delayed values after the close;
    # 0: none). After a refusal (no subscription, competing session...) a contract is
    # asked again after `ib_greeks_retry_s`.
    ib_greeks: bool = True
    ib_greeks_lines: Annotated[int, Field(ge=1, le=10_000)] = 90
    ib_greeks_requests_per_s: Annotated[int, Field(ge=1, le=40)] = 20
    ib_greeks_rotation_s: Annotated[float, Field(ge=5, le=3600)] = 60.0
    ib_greeks_sample_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    ib_greeks_min_interval_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    ib_greeks_tolerance: Annotated[float, Field(ge=0, le=10)] = 0.01
    ib_greeks_snapshot_timeout_s: Annotated[float, Field(gt=0, le=120)] = 12.0
    ib_greeks_retry_s: Seconds = 60.0
    ib_greeks_data_type: Annotated[int, Field(ge=1, le=4)] = 1
    ib_greeks_fallback_data_type: Annotated[int, Field(ge=0, le=4)] = 4

    # Producer: buffering while Redis is away.
    producer_buffer_max: Annotated[int, Field(ge=1)] = 100_000
    producer_spool_dir: Annotated[str, Field(min_length=1)] = "./spool"
    # Only for a stream's sole producer: entry IDs from timestamps, so retries are recognised.
    producer_explicit_ids: bool = False
    producer_flush_timeout_s: Seconds = 10.0
    # Durability against losing the master: after each pipeline of XADDs wait for this
    # many replicas to confirm (WAIT; with producer_wait_aof, WAITAOF: also fsynced to
    # the master's and the replicas' AOF, Redis 7.2+). Unconfirmed is not published: the
    # pipeline is sent again (the consumers' key dedup absorbs the repeats). 0: off.
    producer_wait_replicas: Annotated[int, Field(ge=0, le=100)] = 0
    # Below the writer's 30 s reply timeout, or a long WAIT would look like a dead link.
    producer_wait_timeout_ms: Annotated[int, Field(ge=1, le=25_000)] = 500
    producer_wait_aof: bool = False

    # How far back time travel must keep working: the tables' tombstone retention
    # (set at creation and by `poslake maintain`), and the vacuum floor `poslake maintain`
    # keeps unless forced. Every checkpoint carries a tombstone per file removed within
    # it (~50 a batch), so a longer window makes every open and checkpoint dearer.
    history_retention_hours: Annotated[float, Field(gt=0, le=24 * 3650)] = (
        DEFAULT_HISTORY_RETENTION_HOURS
    )

    # Prometheus /metrics and /healthz of the producer or consumer; port 0 turns it off.
    metrics_host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    # The strategy book (poslake book): untagged fills this close together form one
    # strategy; a close and an open this close together are a roll.
    book_group_window_s: Seconds = 60.0
    book_roll_window_s: Seconds = 3_600.0
    book_snapshot_s: Annotated[float, Field(ge=1, le=MAX_SECONDS)] = 60.0  # marks and Greeks
    book_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0  # between steps

    # Testing only: the consumer SIGKILLs itself at this point of the given batch.
    fault_crash_at: CrashPoint | None = None
    fault_crash_on_batch: Annotated[int, Field(ge=1)] = 1
    fault_book_crash_after_commits: Annotated[int, Field(ge=1)] | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        target = RedisTarget.parse(value)  # its ValueError never quotes the password
        if target.tls is not None:
            target.tls.check()  # the certificate files exist and load
        return value

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                # Position only: the text around it may be a secret.
                raise ValueError(
                    f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                ) from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object of option names to string values")
        for name, option in value.items():
            if not isinstance(option, str):
                raise ValueError(
                    f"the value of {str(name)!r} must be a JSON string "
                    f"(got a JSON {_json_type(option)})"
                )
        return value

    @field_validator("lake_uri")
    @classmethod
    def _lake_scheme(cls, value: str) -> str:
        try:
            scheme = urlsplit(value).scheme.lower()
        except ValueError:
            raise ValueError("not a valid path or URI") from None
        # A one-letter "scheme" is a Windows drive; no scheme is a local path.
        if len(scheme) > 1 and scheme not in LAKE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}: a local path, or one of "
                + ", ".join(f"{name}://" for name in sorted(LAKE_SCHEMES))
            )
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOSTNAME.fullmatch(value):
                raise ValueError("must be an IP address or a host name") from None
        return value

    @field_validator("ib_timezone")
    @classmethod
    def _ib_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name, e.g. America/New_York") from None
        return value

    @field_validator("ib_accounts", mode="before")
    @classmethod
    def _account_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("POSLAKE_RETRY_MAX_S must be at least POSLAKE_RETRY_INITIAL_S")
        if self.ib_reconnect_max_s < self.ib_reconnect_initial_s:
            raise ValueError(
                "POSLAKE_IB_RECONNECT_MAX_S must be at least POSLAKE_IB_RECONNECT_INITIAL_S"
            )
        if self.ib_greeks and self.ib_greeks_requests_per_s + self.ib_pnl_requests_per_s > 44:
            raise ValueError(
                "POSLAKE_IB_GREEKS_REQUESTS_PER_S plus POSLAKE_IB_PNL_REQUESTS_PER_S must stay "
                "under ib_async's throttle of 45 requests/s"
            )
        if self.ib_greeks_fallback_data_type not in (0, 3, 4):
            raise ValueError("POSLAKE_IB_GREEKS_FALLBACK_DATA_TYPE must be 0 (none), 3 or 4")
        if self.compact_target_file_bytes < self.compact_small_file_bytes:
            raise ValueError(
                "POSLAKE_COMPACT_TARGET_FILE_BYTES must be at least "
                "POSLAKE_COMPACT_SMALL_FILE_BYTES"
            )
        return self

    @property
    def redis_target(self) -> RedisTarget:
        """The parsed Redis URL (checked at start, so this cannot fail)."""
        return RedisTarget.parse(self.redis_url)

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL as it may be shown: the password replaced by ``***``."""
        return redacted_url(self.redis_url)

    @property
    def dlq_stream(self) -> str:
        """The dead-letter stream beside the main one."""
        return f"{self.stream}:dlq"

    @property
    def maintenance_lease_key(self) -> str:
        """The key a consumer holds while it runs table maintenance (one at a time)."""
        return f"poslake:{self.stream}:{self.group}:maintenance"

    @property
    def book_lease_key(self) -> str:
        """The key ``poslake book`` holds while it feeds the book (one at a time)."""
        return f"poslake:{self.stream}:book"

    @property
    def book_progress_key(self) -> str:
        """Where ``poslake book`` notes the executions version its last step reflected
        and when (``<version> <unix time>``; shown by ``poslake status``)."""
        return f"poslake:{self.stream}:book:progress"

    @property
    def spool_path(self) -> Path:
        """The producer's overflow file for this stream."""
        return Path(self.producer_spool_dir) / f"{self.stream}.spool"

    def lake_table_uri(self, table: str) -> str:
        """Where the lake table named ``table`` (shared/lake_names.py) lives."""
        return f"{self.lake_uri.rstrip('/')}/{table}"

    @property
    def table_uri(self) -> str:
        """Where the ``position_updates`` table lives."""
        return self.lake_table_uri(lake_names.POSITION_UPDATES)

    @property
    def current_table_uri(self) -> str:
        """Where the ``positions_current`` table lives."""
        return self.lake_table_uri(lake_names.POSITIONS_CURRENT)


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _env_name(location: tuple[int | str, ...]) -> str:
    name = str(location[0]) if location else "?"
    return f"{ENV_PREFIX}{name.upper()}"


def setting_names() -> frozenset[str]:
    """Every ``POSLAKE_*`` variable the settings read."""
    return frozenset(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """A warning for each ``POSLAKE_*`` variable that is no setting (a typo, most likely)."""
    environ = dict(os.environ) if environ is None else environ
    known = setting_names()
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        nearest = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings


def _shown_input(field_name: str, value: object) -> str:
    """What of a bad value an error may repeat: nothing of a secret, a short form else."""
    if field_name in _SECRET_FIELDS or isinstance(value, dict):
        return ""
    text = repr(value)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def load_settings(**overrides: object) -> Settings:
    """Read the settings once; raise :class:`ConfigError` naming each bad variable.

    The message never repeats the value of the Redis URL, the lake URI or a
    storage option: they may hold passwords and keys.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=True):
            loc = error.get("loc", ())
            where = _env_name(loc) if loc else "settings"
            field_name = str(loc[0]) if loc else ""
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}{_shown_input(field_name, error.get('input'))}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
    except SettingsError as exc:
        # A value that is not even parseable for its type; pydantic-settings' message
        # quotes it, so only the variable is named.
        match = re.search(r'field "(\w+)"', str(exc))
        where = _env_name((match.group(1),)) if match else "settings"
        raise ConfigError(f"invalid setting: {where}: cannot be parsed") from None


def load_settings_or_report(program: str) -> Settings | None:
    """For entry points: the settings, or ``None`` after printing what is wrong.

    Unknown ``POSLAKE_*`` variables get a warning on stderr with the nearest name.
    From here on the process masks its secrets in everything it prints and logs
    (infra/redaction.py): those of the raw variables first, in case they are
    invalid, then those of the settings.
    """
    redaction.install(_raw_secrets(os.environ))
    for warning in unknown_variables():
        print(f"{program}: warning: {warning}", file=sys.stderr)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{program}: {redaction.scrub(str(exc))}", file=sys.stderr)
        return None
    redaction.install(
        redaction.secrets_of(settings.redis_url, settings.storage_options, settings.lake_uri)
    )
    return settings


def _raw_secrets(environ: Mapping[str, str]) -> list[str]:
    """The secrets in the environment as given, valid or not."""
    raw = {name.upper(): value for name, value in environ.items()}
    options: object = None
    with contextlib.suppress(json.JSONDecodeError):
        options = json.loads(raw.get(f"{ENV_PREFIX}STORAGE_OPTIONS", "") or "{}")
    return redaction.secrets_of(
        raw.get(f"{ENV_PREFIX}REDIS_URL"),
        options if isinstance(options, dict) else None,
        raw.get(f"{ENV_PREFIX}LAKE_URI"),
    )
