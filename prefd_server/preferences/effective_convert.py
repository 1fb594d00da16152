"""Effective values on the wire, serialized once per org base and assembled per subject.

A subject whose USER layer sets none of the selected keys gets its org base's body as it is; one with
own values gets the base's serialized pieces with its own values' pieces in their places. Protobuf
concatenation makes this exact: a repeated field is its entries one after another, and a Struct is its
map entries one after another, so the nested object is one entry per top-level key segment and only the
segments holding an own value are serialized again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import struct_pb2

from prefd.v1 import common_pb2
from prefd_server.kernel.model import ResolvedValue, Subject
from prefd_server.preferences.cache import OrgBase, SubjectValues
from prefd_server.preferences.resolve import nest
from prefd_server.rpc.convert import effective_to_pb

# Field numbers of the values and the nested object in GetEffectivePreferencesResponse and in
# SubjectPreferences (which has the subject as field 1).
_EFFECTIVE_FIELDS = (1, 2)
_SUBJECT_FIELDS = (2, 3)


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (numbers below 16: a one-byte tag)."""
    return bytes([number << 3 | 2]) + _varint(len(payload)) + payload


def _segment(key: str) -> str:
    return key.split(".", 1)[0]


def _value_piece(value: ResolvedValue) -> bytes:
    """One EffectiveValue, serialized (without its field tag)."""
    return effective_to_pb([value])[0].SerializeToString()


def _nested_entry(segment: str, values: Sequence[ResolvedValue]) -> bytes:
    """The Struct map entry of one top-level segment over `values` (all of that segment), with its tag."""
    struct = struct_pb2.Struct()
    struct.update(nest({v.key: v.value for v in values}))
    return struct.SerializeToString()


@dataclass(slots=True)
class WireBase:
    """An org base serialized: each value's piece, each segment's nested entry, the values tagged as
    GetEffectivePreferencesResponse fields, the whole body, and blobs per other field layout."""

    pieces: list[bytes]
    position: dict[str, int]
    segments: dict[str, list[int]]  # segment -> positions of its values
    entries: dict[str, bytes]
    tagged: list[bytes] = field(default_factory=list)  # each piece as field 1 of the response
    body: bytes = b""  # the whole GetEffectivePreferencesResponse body
    blobs: dict[tuple[int, int], tuple[bytes, bytes]] = field(default_factory=dict)

    def blob(self, fields: tuple[int, int]) -> tuple[bytes, bytes]:
        """(every value as field fields[0], the nested object as field fields[1])."""
        made = self.blobs.get(fields)
        if made is None:
            values = b"".join(_field(fields[0], piece) for piece in self.pieces)
            nested = _field(fields[1], b"".join(self.entries.values()))
            made = self.blobs[fields] = (values, nested)
        return made


def wire_base(base: OrgBase) -> WireBase:
    """The base's serialized form, built on first use and kept with the base."""
    wire = base.wire
    if wire is None:
        segments: dict[str, list[int]] = {}
        for n, value in enumerate(base.values):
            segments.setdefault(_segment(value.key), []).append(n)
        pieces = [_value_piece(v) for v in base.values]
        entries = {s: _nested_entry(s, [base.values[n] for n in ns]) for s, ns in segments.items()}
        tagged = [_field(_EFFECTIVE_FIELDS[0], piece) for piece in pieces]
        body = b"".join(tagged) + _field(_EFFECTIVE_FIELDS[1], b"".join(entries.values()))
        wire = base.wire = WireBase(
            pieces, {v.key: n for n, v in enumerate(base.values)}, segments, entries, tagged, body
        )
    assert isinstance(wire, WireBase)
    return wire


@dataclass(slots=True, eq=False)
class OwnBody:
    """A subject's GetEffectivePreferencesResponse body kept as its org base's parts plus its own: the
    tagged values and nested entries it replaces. Joined when served (a few microseconds), it holds a few
    hundred bytes per own value where the whole body is the size of every value."""

    wire: WireBase
    values: dict[int, bytes]  # position -> the subject's tagged value there
    entries: dict[str, bytes]  # segment -> the subject's nested entry for it
    size: int

    def body(self) -> bytes:
        tagged = list(self.wire.tagged)
        for position, piece in self.values.items():
            tagged[position] = piece
        entries = {**self.wire.entries, **self.entries}
        return b"".join(tagged) + _field(_EFFECTIVE_FIELDS[1], b"".join(entries.values()))


def _own_parts(subject_values: SubjectValues) -> tuple[WireBase, dict[int, bytes], dict[str, bytes]]:
    """The base's wire form, and the subject's own values and nested entries (for `fields`)."""
    wire = wire_base(subject_values.base)
    own = subject_values.own
    values = {wire.position[key]: _value_piece(value) for key, value in own.items()}
    base_values = subject_values.base.values
    entries = {
        segment: _nested_entry(segment, [own.get(base_values[n].key, base_values[n]) for n in wire.segments[segment]])
        for segment in {_segment(key) for key in own}
    }
    return wire, values, entries


def effective_kept(subject_values: SubjectValues) -> tuple[bytes | OwnBody, int]:
    """What to keep of a subject's GetEffectivePreferencesResponse body, and its size beyond the parts its
    org base holds: the base's body itself (nothing more), or an OwnBody."""
    if not subject_values.own:
        return wire_base(subject_values.base).body, 0
    wire, values, entries = _own_parts(subject_values)
    tagged = {position: _field(_EFFECTIVE_FIELDS[0], piece) for position, piece in values.items()}
    size = 200 + sum(len(p) + 100 for p in tagged.values()) + sum(len(e) + 100 for e in entries.values())
    return OwnBody(wire, tagged, entries, size), size


def effective_body(kept: bytes | OwnBody) -> bytes:
    """A GetEffectivePreferencesResponse without its cursor."""
    return kept if isinstance(kept, bytes) else kept.body()


def _assemble(subject_values: SubjectValues, fields: tuple[int, int]) -> bytes:
    values_blob, nested_blob = wire_base(subject_values.base).blob(fields)
    if not subject_values.own:
        return values_blob + nested_blob
    wire, values, entries = _own_parts(subject_values)
    pieces = [values.get(n, piece) for n, piece in enumerate(wire.pieces)]
    merged = {**wire.entries, **entries}
    return b"".join(_field(fields[0], piece) for piece in pieces) + _field(fields[1], b"".join(merged.values()))


def subject_preferences(subject: Subject, subject_values: SubjectValues) -> bytes:
    """One SubjectPreferences message, serialized."""
    head = common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id).SerializeToString()
    return _field(1, head) + _assemble(subject_values, _SUBJECT_FIELDS)


def batch_body(results: Sequence[bytes], cursor: bytes) -> bytes:
    """A BatchGetEffectivePreferencesResponse from serialized SubjectPreferences and the serialized
    cursor field."""
    return b"".join(_field(1, result) for result in results) + cursor
