"""The wire format of one stream entry (documented for other producers in README.md).

An entry has two fields:

``v``
    The schema version, ASCII decimal. This module reads and writes ``1``.
``payload``
    A UTF-8 JSON object with the fields of :class:`shared.model.PositionUpdate`,
    encoded with msgspec. Unknown fields are ignored, so optional fields can be
    added without a new version; anything that changes a field's meaning bumps it.

Decoding never raises for bad input: it sorts entries into updates and poison,
and poison carries a reason a person can act on. Whatever fails while decoding one
entry (a malformed or too deeply nested payload, a value out of range, bytes that
are not UTF-8) makes that entry poison and no other. An entry larger than
``max_entry_bytes`` (field names and values together) is poison without its
payload being parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shared.errors import PoisonEntry
from shared.model import LABEL_FIELDS, PositionUpdate

VERSION_FIELD = "v"
PAYLOAD_FIELD = "payload"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

_VERSION_KEY = VERSION_FIELD.encode()
_PAYLOAD_KEY = PAYLOAD_FIELD.encode()
_CURRENT_VERSION = str(SCHEMA_VERSION).encode()

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PositionUpdate)
_BOM = b"\xef\xbb\xbf"
# The bytes of the ``v`` and ``payload`` names and of ``1`` in the common layout.
_COMMON_OVERHEAD = len(_VERSION_KEY) + len(_CURRENT_VERSION) + len(_PAYLOAD_KEY)
DEFAULT_MAX_ENTRY_BYTES = 65_536
# JSON strings cannot hold a raw control character below U+0020 (msgspec rejects it),
# only an escape: a payload without a backslash or a DEL byte holds none.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _may_hold_control(payload: bytes) -> bool:
    return b"\\" in payload or b"\x7f" in payload


def control_field(update: PositionUpdate) -> str | None:
    """The first text field of ``update`` holding a control character, if any."""
    for name in LABEL_FIELDS:
        if _CONTROL.search(getattr(update, name)):
            return name
    return None


EntryFields = Mapping[bytes, bytes]


CURRENT_VERSION = _CURRENT_VERSION
"""The ``v`` field's value this module writes, as bytes."""


def encode_update(update: PositionUpdate) -> dict[str, bytes]:
    """The stream entry fields for one update."""
    return {VERSION_FIELD: _CURRENT_VERSION, PAYLOAD_FIELD: _encoder.encode(update)}


def encode_payload(update: PositionUpdate) -> bytes:
    """Just the ``payload`` field's value for one update."""
    return _encoder.encode(update)


@dataclass(slots=True)
class PoisonRecord:
    """An entry that cannot be processed, with why."""

    entry_id: bytes
    fields: EntryFields
    reason: str


@dataclass(slots=True)
class DecodedBatch:
    """Entries sorted into decodable updates and poison, in stream order."""

    entry_ids: list[bytes] = field(default_factory=list)
    updates: list[PositionUpdate] = field(default_factory=list)
    poison: list[PoisonRecord] = field(default_factory=list)


def entry_bytes(fields: EntryFields | Sequence[bytes]) -> int:
    """An entry's size: its field names and values, in bytes."""
    if isinstance(fields, Mapping):
        return sum(len(k) + len(v) for k, v in fields.items())
    return sum(map(len, fields))


def decode_entry(
    fields: EntryFields, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
) -> PositionUpdate:
    """Decode one entry's fields; raises :class:`PoisonEntry` with the reason if it is poison."""
    size = entry_bytes(fields)
    if size > max_entry_bytes:
        raise PoisonEntry(
            f"entry is {size} bytes, more than the limit of {max_entry_bytes} "
            "(POSLAKE_MAX_ENTRY_BYTES); payload not decoded"
        )
    version = fields.get(_VERSION_KEY)
    if version is None:
        raise PoisonEntry(f"missing field {VERSION_FIELD!r}")
    if version != _CURRENT_VERSION:
        try:
            number = int(version)
        except ValueError:
            raise PoisonEntry(f"schema version {version!r} is not a number") from None
        if number not in SUPPORTED_VERSIONS:
            raise PoisonEntry(f"unknown schema version {number}")
    payload = fields.get(_PAYLOAD_KEY)
    if payload is None:
        raise PoisonEntry(f"missing field {PAYLOAD_FIELD!r}")
    if payload.startswith(_BOM):
        raise PoisonEntry("invalid payload: starts with a UTF-8 byte-order mark")
    try:
        payload.decode()  # msgspec does not check the fields it skips
    except UnicodeDecodeError as exc:
        reason = f"invalid payload: not UTF-8 ({exc.reason} at byte {exc.start})"
        raise PoisonEntry(reason) from None
    try:
        update = _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PoisonEntry(f"invalid payload: {exc}") from None
    except RecursionError:
        raise PoisonEntry("invalid payload: nested too deeply") from None
    except Exception as exc:  # any failure is this entry's alone
        raise PoisonEntry(f"invalid payload: {type(exc).__name__}: {exc}") from None
    if _may_hold_control(payload):
        name = control_field(update)
        if name is not None:
            raise PoisonEntry(f"invalid payload: a control character in `$.{name}`")
    return update


def fields_as_dict(fields: EntryFields | Sequence[bytes]) -> dict[bytes, bytes]:
    """An entry's fields as a dict, from a mapping or Redis's flat ``[k1, v1, ...]``."""
    if isinstance(fields, Mapping):
        return dict(fields)
    return dict(zip(fields[::2], fields[1::2], strict=True))


def decode_entries(
    entries: Iterable[tuple[bytes, EntryFields | Sequence[bytes]]],
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
) -> DecodedBatch:
    """Sort stream entries into updates and poison, keeping stream order.

    The common layout (``v 1 payload <json>`` exactly, as our publisher writes it)
    is decoded for the whole batch in one msgspec call; anything else, and any
    batch in which that call fails, goes entry by entry so each poison entry
    gets its own reason.
    """
    entries = list(entries)
    ids: list[bytes] = []
    payloads: list[bytes] = []
    others = 0
    max_payload = max_entry_bytes - _COMMON_OVERHEAD
    for entry_id, fields in entries:
        if (
            type(fields) is list
            and len(fields) == 4
            and fields[0] == _VERSION_KEY
            and fields[1] == _CURRENT_VERSION
            and fields[2] == _PAYLOAD_KEY
            and len(fields[3]) <= max_payload
            and b"\n" not in fields[3]
        ):
            ids.append(entry_id)
            payloads.append(fields[3])
        else:
            others += 1
    if not others:
        try:
            # One line per payload (none holds a newline): lines map 1:1 to entries.
            lines = b"\n".join(payloads)
            lines.decode()  # UTF-8 throughout, the fields msgspec skips included
            updates = _decoder.decode_lines(lines)
        except Exception:  # any failure: find the culprits one by one
            pass
        else:
            if not _may_hold_control(lines) or not any(map(control_field, updates)):
                return DecodedBatch(ids, updates, [])
    return _decode_one_by_one(entries, max_entry_bytes)


def _decode_one_by_one(entries: Iterable[tuple[bytes, Any]], max_entry_bytes: int) -> DecodedBatch:
    batch = DecodedBatch()
    for entry_id, raw in entries:
        try:
            fields = fields_as_dict(raw)
        except Exception as exc:  # e.g. an odd-length reply
            batch.poison.append(PoisonRecord(entry_id, {}, f"unreadable entry: {exc}"))
            continue
        try:
            update = decode_entry(fields, max_entry_bytes)
        except PoisonEntry as exc:
            batch.poison.append(PoisonRecord(entry_id, fields, exc.reason))
            continue
        batch.entry_ids.append(entry_id)
        batch.updates.append(update)
    return batch


def encode_many(updates: Sequence[PositionUpdate]) -> list[dict[str, bytes]]:
    """Entry fields for many updates (one encoder, no per-call setup)."""
    return [{VERSION_FIELD: _CURRENT_VERSION, PAYLOAD_FIELD: _encoder.encode(u)} for u in updates]
