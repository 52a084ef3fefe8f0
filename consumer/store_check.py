"""Before a writer starts: does the lake's object store honour put-if-absent?

delta-rs commits a version by writing ``_delta_log/<v>.json`` with
``If-None-Match: *`` and counts on a second writer of the same version being
refused (412). A store that ignores the header lets the second writer overwrite
the first one's commit: both are told they committed, one commit is gone, and
nothing ever reports it (moto 5.0.13 did this; ../shared/notes/scale-out.md). So
before a consumer writes to a lake on an object store it puts a probe object
under ``<lake>/_poslake/`` twice with put-if-absent (``mode="create"``, the same
Rust ``object_store`` code delta-rs uses, through obstore) and refuses to run
unless the second put is refused. Local folders need no check: there a commit is
a rename that cannot replace an existing file.

The store is reached with the lake's storage options (delta-rs names them as
object_store does: ``AWS_ENDPOINT_URL``, ``aws_access_key_id``, ``endpoint``...);
those about the HTTP client (``AWS_ALLOW_HTTP``, ``timeout``) go to the client,
delta-rs' own (retries, locking) are not the store's and are left out, and every
other one goes to the store (an option obstore does not know stops the program,
naming the options, rather than checking some other store).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from shared import lake_names
from shared.errors import ConfigError, UnsafeStore

log = logging.getLogger(__name__)

# object_store's client options, by the name without a store prefix.
_CLIENT_OPTIONS = frozenset(
    {
        "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
        "http1_only", "http2_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle", "http2_max_frame_size", "pool_idle_timeout",
        "pool_max_idle_per_host", "proxy_url", "proxy_ca_certificate", "proxy_excludes",
        "randomize_addresses", "timeout", "user_agent",
    }
)  # fmt: skip
# delta-rs' options that are not object_store's (they steer delta-rs itself).
_DELTA_ONLY = frozenset(
    {
        "aws_s3_locking_provider", "aws_s3_allow_unsafe_rename", "delta_dynamo_table_name",
        "aws_force_credential_load", "max_retries", "retry_timeout", "mount_allow_unsafe_rename",
    }
)  # fmt: skip
_STORE_PREFIXES = ("aws_", "azure_", "google_")
_LOCAL_SCHEMES = frozenset({"", "file"})


def needs_check(lake_uri: str) -> bool:
    """Whether the lake is on an object store (not a local folder, not in memory)."""
    scheme = urlsplit(lake_uri).scheme.lower()
    return scheme not in _LOCAL_SCHEMES and len(scheme) > 1 and scheme != "memory"


def store_options(options: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """delta-rs storage options as obstore takes them: (store config, client options)."""
    config: dict[str, str] = {}
    client: dict[str, str] = {}
    for name, value in options.items():
        key = name.lower()
        bare = next((key[len(p) :] for p in _STORE_PREFIXES if key.startswith(p)), key)
        if key in _DELTA_ONLY:
            continue
        if bare in _CLIENT_OPTIONS:
            client[bare] = value
        else:  # the store's own, prefixed or not (``endpoint``, ``aws_region``...)
            config[key] = value
    return config, client


def object_store(lake_uri: str, options: Mapping[str, str]) -> Any:
    """An obstore store at ``lake_uri`` reached with the lake's storage options.

    Raises :class:`ConfigError` when the options cannot describe a store.
    """
    from obstore.exceptions import BaseError  # noqa: PLC0415
    from obstore.store import from_url  # noqa: PLC0415

    config, client = store_options(options)
    try:
        # Options go through as object_store parses them; the stubs' TypedDicts are stricter.
        opened: Any = from_url(lake_uri, config=config or None, client_options=client or None)  # type: ignore[arg-type]
        return opened
    except (BaseError, ValueError, TypeError) as exc:
        # The message may quote an option's value: name the setting, not the text.
        raise ConfigError(
            f"POSLAKE_STORAGE_OPTIONS: cannot describe the lake's store with these options "
            f"({type(exc).__name__}; option names: {', '.join(sorted(options)) or 'none'})"
        ) from None


def _unsupported() -> UnsafeStore:
    return UnsafeStore(
        "POSLAKE_LAKE_URI: the lake's store does not support conditional writes "
        "(put-if-absent): Delta commits of several writers would not be safe there"
    )


def check_put_if_absent(lake_uri: str, options: Mapping[str, str]) -> None:
    """Put a probe object twice with put-if-absent; return if the second is refused.

    Raises :class:`UnsafeStore` when the store accepts it (the consumer must not
    write there), :class:`ConfigError` when the storage options cannot describe
    a store, and ``OSError`` when the store cannot be reached or refuses access:
    the consumer retries that as it retries opening the tables; an operator
    command reports it (exit 4 or 6).
    """
    if not needs_check(lake_uri):
        return
    import obstore  # noqa: PLC0415 - only lakes on object stores need it
    from obstore.exceptions import (  # noqa: PLC0415
        AlreadyExistsError,
        BaseError,
        NotSupportedError,
        PreconditionError,
    )

    store = object_store(lake_uri, options)
    key = f"{lake_names.PROBE_PREFIX}/put-if-absent-{uuid.uuid4().hex}"
    try:
        obstore.put(store, key, b"first", mode="create")
    except NotSupportedError:
        raise _unsupported() from None
    except BaseError as exc:  # not reachable, or access refused: the caller decides
        raise OSError(f"the lake's store check could not write {key}: {exc}") from None
    try:
        try:
            obstore.put(store, key, b"second", mode="create")
        except (AlreadyExistsError, PreconditionError):
            log.info("the lake's store refuses a second put-if-absent: commits are safe")
            return
        except NotSupportedError:
            raise _unsupported() from None
        except BaseError as exc:
            raise OSError(f"the lake's store check could not write {key}: {exc}") from None
        raise UnsafeStore(
            "POSLAKE_LAKE_URI: the lake's store accepted a second put-if-absent of one key "
            "(it ignores If-None-Match): two consumers committing at once would overwrite "
            "each other's Delta commits without an error. Use a store that honours "
            "conditional writes (AWS S3, SeaweedFS, MinIO, R2, moto 5.1+)."
        )
    finally:
        try:
            obstore.delete(store, key)
        except (BaseError, OSError) as exc:
            log.warning(
                "cannot delete the store check's probe object",
                extra={"key": key, "error": type(exc).__name__},
            )
