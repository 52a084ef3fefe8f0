"""The wire format of one stream entry (documented for other producers in README.md).

An entry has two or three fields:

``v``
    The schema version, ASCII decimal. This module reads and writes ``1``.
``kind``
    The entry kind's tag (shared/kinds.py), ASCII. Absent means ``position``, so
    every producer written before kinds existed stays valid; this module writes it
    for every kind but positions.
``payload``
    A UTF-8 JSON object with the fields of the kind's model (for positions
    :class:`shared.model.PositionUpdate`), encoded with msgspec. Unknown fields are
    ignored, so optional fields can be added without a new version; anything that
    changes a field's meaning bumps it.

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
from shared.kinds import DEFAULT_KIND, KINDS, EntryKind, kind_of
from shared.model import PositionUpdate

VERSION_FIELD = "v"
KIND_FIELD = "kind"
PAYLOAD_FIELD = "payload"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

_VERSION_KEY = VERSION_FIELD.encode()
_KIND_KEY = KIND_FIELD.encode()
_PAYLOAD_KEY = PAYLOAD_FIELD.encode()
_CURRENT_VERSION = str(SCHEMA_VERSION).encode()

_encoder = msgspec.json.Encoder()
_decoders: dict[EntryKind, msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(kind.model) for kind in KINDS
}
_KIND_OF_TAG = {kind.tag.encode(): kind for kind in KINDS}
_BOM = b"\xef\xbb\xbf"
# The bytes of the ``v`` and ``payload`` names and of ``1`` in the common layout.
_COMMON_OVERHEAD = len(_VERSION_KEY) + len(_CURRENT_VERSION) + len(_PAYLOAD_KEY)
DEFAULT_MAX_ENTRY_BYTES = 65_536
# JSON strings cannot hold a raw control character below U+0020 (msgspec rejects it),
# only an escape: a payload without a backslash or a DEL byte holds none.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _may_hold_control(payload: bytes) -> bool:
    return b"\\" in payload or b"\x7f" in payload


def control_field(update: msgspec.Struct) -> str | None:
    """The first text field of ``update`` holding a control character, if any."""
    for name in kind_of(update).label_fields:
        value: Any = update
        for part in name.split("."):  # "execution.account": a nested struct's field
            value = getattr(value, part) if value is not None else None
        if value is not None and _CONTROL.search(value):
            return name
    return None


EntryFields = Mapping[bytes, bytes]


CURRENT_VERSION = _CURRENT_VERSION
"""The ``v`` field's value this module writes, as bytes."""


def encode_update(update: msgspec.Struct) -> dict[str, bytes]:
    """The stream entry fields for one observation of any kind."""
    kind = kind_of(update)
    if kind is DEFAULT_KIND:
        return {VERSION_FIELD: _CURRENT_VERSION, PAYLOAD_FIELD: _encoder.encode(update)}
    return {
        VERSION_FIELD: _CURRENT_VERSION,
        KIND_FIELD: kind.tag.encode(),
        PAYLOAD_FIELD: _encoder.encode(update),
    }


def encode_payload(update: msgspec.Struct) -> bytes:
    """Just the ``payload`` field's value for one update."""
    return _encoder.encode(update)


@dataclass(slots=True)
class PoisonRecord:
    """An entry that cannot be processed, with why."""

    entry_id: bytes
    fields: EntryFields
    reason: str


@dataclass(slots=True)
class KindEntries:
    """The decoded entries of one kind, in stream order."""

    entry_ids: list[bytes] = field(default_factory=list)
    updates: list[Any] = field(default_factory=list)  # the kind's model


@dataclass(slots=True)
class DecodedBatch:
    """Entries sorted into decodable ones, per kind, and poison, in stream order."""

    by_kind: dict[EntryKind, KindEntries] = field(default_factory=dict)
    poison: list[PoisonRecord] = field(default_factory=list)

    def add(self, entry_id: bytes, update: msgspec.Struct) -> None:
        kind = kind_of(update)
        entries = self.by_kind.get(kind)
        if entries is None:
            entries = self.by_kind[kind] = KindEntries()
        entries.entry_ids.append(entry_id)
        entries.updates.append(update)

    @property
    def updates(self) -> list[Any]:
        """Every decoded observation, kind by kind."""
        return [u for entries in self.by_kind.values() for u in entries.updates]


def entry_bytes(fields: EntryFields | Sequence[bytes]) -> int:
    """An entry's size: its field names and values, in bytes."""
    if isinstance(fields, Mapping):
        return sum(len(k) + len(v) for k, v in fields.items())
    return sum(map(len, fields))


def decode_entry(
    fields: EntryFields, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
) -> PositionUpdate:
    """Decode one position entry's fields; raises :class:`PoisonEntry` with the reason
    if it is poison or of another kind."""
    update = decode_observation(fields, max_entry_bytes)
    if not isinstance(update, PositionUpdate):
        raise PoisonEntry(f"not a position entry: kind {kind_of(update).tag!r}")
    return update


def decode_observation(
    fields: EntryFields, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
) -> msgspec.Struct:
    """Decode one entry of any kind; raises :class:`PoisonEntry` with the reason if it
    is poison."""
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
    tag = fields.get(_KIND_KEY)
    kind = DEFAULT_KIND if tag is None else _KIND_OF_TAG.get(tag)
    if kind is None:
        shown = tag.decode("utf-8", "replace")[:64] if tag is not None else ""
        raise PoisonEntry(f"unknown entry kind {shown!r}")
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
        update: msgspec.Struct = _decoders[kind].decode(payload)
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
    """Sort stream entries into observations per kind and poison, keeping stream order.

    The common layouts (``v 1 payload <json>`` for positions, ``v 1 kind <tag>
    payload <json>`` for the others, exactly, as our publisher writes them) are
    decoded in one msgspec call per kind; anything else, and every entry of a kind
    whose call fails, goes entry by entry so each poison entry gets its own reason.
    """
    entries = list(entries)
    common: dict[EntryKind, tuple[list[int], list[bytes]]] = {}
    single: list[int] = []  # positions of the entries to decode one by one
    max_payload = max_entry_bytes - _COMMON_OVERHEAD
    for at, (_, fields) in enumerate(entries):
        kind = _common_layout(fields, max_payload)
        if kind is None:
            single.append(at)
            continue
        layout = common.get(kind)
        if layout is None:
            layout = common[kind] = ([], [])
        layout[0].append(at)
        layout[1].append(fields[-1])  # type: ignore[index]
    batch = DecodedBatch()
    bulk: dict[EntryKind, list[int]] = {}
    for kind, (positions, payloads) in common.items():
        try:
            # One line per payload (none holds a newline): lines map 1:1 to entries.
            lines = b"\n".join(payloads)
            lines.decode()  # UTF-8 throughout, the fields msgspec skips included
            updates = _decoders[kind].decode_lines(lines)
            if _may_hold_control(lines) and any(map(control_field, updates)):
                raise ValueError("a control character")
        except Exception:  # any failure: find the culprits one by one
            single.extend(positions)
            continue
        bulk[kind] = positions
        batch.by_kind[kind] = KindEntries([entries[i][0] for i in positions], updates)
    if not single:
        return batch
    single.sort()
    singles = _decode_one_by_one([entries[i] for i in single], max_entry_bytes)
    batch.poison = singles.poison
    for kind, found in singles.by_kind.items():
        held = batch.by_kind.get(kind)
        if held is None:
            batch.by_kind[kind] = found
            continue
        # Both ways decoded entries of this kind: back into stream order.
        at_of = {entries[i][0]: i for i in single}
        merged = sorted(
            [*zip(bulk[kind], held.entry_ids, held.updates, strict=True),
             *((at_of[e], e, u) for e, u in zip(found.entry_ids, found.updates, strict=True))],
            key=lambda item: item[0],
        )  # fmt: skip
        batch.by_kind[kind] = KindEntries([m[1] for m in merged], [m[2] for m in merged])
    return batch


def _common_layout(fields: object, max_payload: int) -> EntryKind | None:
    """The kind of an entry in one of the common layouts (a flat Redis reply), or None."""
    if type(fields) is not list or fields[0] != _VERSION_KEY or fields[1] != _CURRENT_VERSION:
        return None
    if len(fields) == 4:
        kind: EntryKind | None = DEFAULT_KIND
    elif len(fields) == 6 and fields[2] == _KIND_KEY:
        kind = _KIND_OF_TAG.get(fields[3])
    else:
        return None
    payload = fields[-1]
    if kind is not DEFAULT_KIND:
        max_payload -= len(fields[2]) + len(fields[3])
    if fields[-2] != _PAYLOAD_KEY or len(payload) > max_payload or b"\n" in payload:
        return None
    return kind


def _decode_one_by_one(entries: Iterable[tuple[bytes, Any]], max_entry_bytes: int) -> DecodedBatch:
    batch = DecodedBatch()
    for entry_id, raw in entries:
        try:
            fields = fields_as_dict(raw)
        except Exception as exc:  # e.g. an odd-length reply
            batch.poison.append(PoisonRecord(entry_id, {}, f"unreadable entry: {exc}"))
            continue
        try:
            update = decode_observation(fields, max_entry_bytes)
        except PoisonEntry as exc:
            batch.poison.append(PoisonRecord(entry_id, fields, exc.reason))
            continue
        batch.add(entry_id, update)
    return batch


def encode_many(updates: Sequence[msgspec.Struct]) -> list[dict[str, bytes]]:
    """Entry fields for many observations (one encoder, no per-call setup)."""
    if all(type(u) is PositionUpdate for u in updates):
        return [
            {VERSION_FIELD: _CURRENT_VERSION, PAYLOAD_FIELD: _encoder.encode(u)} for u in updates
        ]
    return [encode_update(u) for u in updates]
