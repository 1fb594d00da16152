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
    """An org base serialized: each value's piece, each segment's nested entry, and whole blobs per
    field layout."""

    pieces: list[bytes]
    position: dict[str, int]
    segments: dict[str, list[int]]  # segment -> positions of its values
    entries: dict[str, bytes]
    blobs: dict[tuple[int, int], tuple[bytes, bytes]] = field(default_factory=dict)
    body: bytes | None = None  # the whole GetEffectivePreferencesResponse body

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
        wire = base.wire = WireBase(
            pieces=[_value_piece(v) for v in base.values],
            position={v.key: n for n, v in enumerate(base.values)},
            segments=segments,
            entries={s: _nested_entry(s, [base.values[n] for n in ns]) for s, ns in segments.items()},
        )
    assert isinstance(wire, WireBase)
    return wire


def _assemble(subject_values: SubjectValues, fields: tuple[int, int]) -> bytes:
    wire = wire_base(subject_values.base)
    values_blob, nested_blob = wire.blob(fields)
    own = subject_values.own
    if not own:
        return values_blob + nested_blob
    pieces = list(wire.pieces)
    for key, value in own.items():
        pieces[wire.position[key]] = _value_piece(value)
    entries = dict(wire.entries)
    base_values = subject_values.base.values
    for segment in {_segment(key) for key in own}:
        values = [own.get(base_values[n].key, base_values[n]) for n in wire.segments[segment]]
        entries[segment] = _nested_entry(segment, values)
    values_part = b"".join(_field(fields[0], piece) for piece in pieces)
    return values_part + _field(fields[1], b"".join(entries.values()))


def effective_body(subject_values: SubjectValues) -> bytes:
    """A GetEffectivePreferencesResponse without its cursor: for a subject without own values, the one
    bytes object its org base keeps."""
    if subject_values.own:
        return _assemble(subject_values, _EFFECTIVE_FIELDS)
    wire = wire_base(subject_values.base)
    if wire.body is None:
        values = b"".join(_field(_EFFECTIVE_FIELDS[0], piece) for piece in wire.pieces)
        wire.body = values + _field(_EFFECTIVE_FIELDS[1], b"".join(wire.entries.values()))
    return wire.body


def subject_preferences(subject: Subject, subject_values: SubjectValues) -> bytes:
    """One SubjectPreferences message, serialized."""
    head = common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id).SerializeToString()
    return _field(1, head) + _assemble(subject_values, _SUBJECT_FIELDS)


def batch_body(results: Sequence[bytes], cursor: bytes) -> bytes:
    """A BatchGetEffectivePreferencesResponse from serialized SubjectPreferences and the serialized
    cursor field."""
    return b"".join(_field(1, result) for result in results) + cursor
