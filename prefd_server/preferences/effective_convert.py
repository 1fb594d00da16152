"""Effective values on the wire, serialized once per org base and assembled per subject.

A subject whose USER layer sets none of the selected keys gets its org base's body as it is; one with
own values gets the base's serialized pieces with its own values' pieces in their places. Protobuf
concatenation makes this exact: a repeated field is its entries one after another, and a Struct is its
map entries one after another, so the nested object is one entry per top-level key segment and only the
segments holding an own value are serialized again.
"""

from __future__ import annotations

import dataclasses
import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefd.v1 import common_pb2
from prefd_server.kernel.model import ResolvedValue, Subject
from prefd_server.preferences.cache import OrgBase, SubjectValues
from prefd_server.preferences.model import Definition
from prefd_server.preferences.resolve import nest
from prefd_server.rpc.convert import effective_to_pb
from prefd_server.rpc.wire import field, struct_fields, struct_value, varint

# Field numbers of the values and the nested object in GetEffectivePreferencesResponse and in
# SubjectPreferences (which has the subject as field 1).
_EFFECTIVE_FIELDS = (1, 2)
_SUBJECT_FIELDS = (2, 3)
# The tag of BatchGetEffectivePreferencesResponse.results (field 1, length-delimited).
_BATCH_RESULT_TAG = bytes([1 << 3 | 2])


def _segment(key: str) -> str:
    return key.split(".", 1)[0]


def _value_piece(value: ResolvedValue) -> bytes:
    """One EffectiveValue, serialized (without its field tag)."""
    return effective_to_pb([value])[0].SerializeToString()


def _nested_entry(values: dict[str, Any]) -> bytes:
    """The Struct map entry of one top-level segment over its values by key (each a JSON value or a
    serialized Value), with its tag."""
    return struct_fields(nest(values))


Piece = bytes | memoryview


@dataclass(slots=True)
class WireBase:
    """An org base serialized once: its GetEffectivePreferencesResponse body (each value as field 1, then the
    nested object as field 2), where each value's field starts in it, each value's JSON value and each
    segment's nested entry serialized, and the same body per other field layout. Every tag is one byte, so
    the spans hold in every layout and a subject's own values are spliced in by slicing, not copying."""

    leaves: list[bytes]  # each value's JSON value as a serialized google.protobuf.Value
    layout: Layout
    entries: dict[str, bytes]
    spans: array[int]  # where value n's field starts in the body; the last: where the values end
    body: bytes  # the whole GetEffectivePreferencesResponse body
    blobs: dict[tuple[int, int], bytes] = dataclasses.field(default_factory=dict)

    def blob(self, fields: tuple[int, int]) -> bytes:
        """The body with every value as field fields[0] and the nested object as field fields[1]."""
        if fields == _EFFECTIVE_FIELDS:
            return self.body
        made = self.blobs.get(fields)
        if made is None:
            view, spans = memoryview(self.body), self.spans
            value_tag, nested_tag = _tag(fields[0]), _tag(fields[1])
            parts: list[Piece] = []
            for start, end in itertools.pairwise(spans):
                parts += (value_tag, view[start + 1 : end])
            parts += (nested_tag, view[spans[-1] + 1 :])
            made = self.blobs[fields] = b"".join(parts)
        return made

    def with_own(self, fields: tuple[int, int], values: dict[int, bytes], entries: dict[str, bytes]) -> list[Piece]:
        """The blob for `fields` with the values at some positions (serialized, untagged) and the nested
        entries of some segments replaced, in pieces to join (slices of the shared blob and the new parts)."""
        view, spans = memoryview(self.blob(fields)), self.spans
        parts: list[Piece] = []
        at = 0
        for position in sorted(values):
            parts += (view[at : spans[position]], field(fields[0], values[position]))
            at = spans[position + 1]
        parts.append(view[at : spans[-1]])
        parts.append(field(fields[1], b"".join({**self.entries, **entries}.values())))
        return parts


def _tag(number: int) -> bytes:
    """The one-byte tag of a length-delimited field numbered 1 to 15."""
    assert 1 <= number <= 15
    return bytes([number << 3 | 2])


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each key of a selection of definitions is among its values, and the positions of each
    top-level segment's values: the same for every org base over the selection, so shared by them."""

    position: dict[str, int]
    segments: dict[str, list[int]]


# Layouts by selection (the definitions list every base over it holds); past MAX_LAYOUTS the oldest goes.
MAX_LAYOUTS = 64
_layouts: dict[int, tuple[list[Definition], Layout]] = {}


def _layout(definitions: list[Definition]) -> Layout:
    known = _layouts.get(id(definitions))
    if known is not None and known[0] is definitions:
        return known[1]
    segments: dict[str, list[int]] = {}
    for n, definition in enumerate(definitions):
        segments.setdefault(_segment(definition.key), []).append(n)
    layout = Layout({d.key: n for n, d in enumerate(definitions)}, segments)
    if len(_layouts) >= MAX_LAYOUTS:
        del _layouts[next(iter(_layouts))]
    _layouts[id(definitions)] = (definitions, layout)
    return layout


def wire_base(base: OrgBase) -> WireBase:
    """The base's serialized form, built on first use and kept with the base."""
    wire = base.wire
    if wire is None:
        layout = _layout(base.definitions)
        tagged = [field(_EFFECTIVE_FIELDS[0], _value_piece(v)) for v in base.values]
        leaves = [struct_value(v.value) for v in base.values]
        entries = {
            segment: _nested_entry({base.values[n].key: leaves[n] for n in positions})
            for segment, positions in layout.segments.items()
        }
        spans = array("I", [0, *itertools.accumulate(map(len, tagged))])
        body = b"".join(tagged) + field(_EFFECTIVE_FIELDS[1], b"".join(entries.values()))
        wire = base.wire = WireBase(leaves, layout, entries, spans, body)
    assert isinstance(wire, WireBase)
    return wire


@dataclass(slots=True, eq=False)
class OwnBody:
    """A subject's GetEffectivePreferencesResponse body kept as its org base's wire form plus its own: the
    values and nested entries it replaces. Joined when served (a few microseconds), it holds a few hundred
    bytes per own value where the whole body is the size of every value."""

    wire: WireBase
    values: dict[int, bytes]  # position -> the subject's value there, serialized
    entries: dict[str, bytes]  # segment -> the subject's nested entry for it
    size: int

    def body(self) -> bytes:
        return b"".join(self.wire.with_own(_EFFECTIVE_FIELDS, self.values, self.entries))


def _own_parts(subject_values: SubjectValues) -> tuple[WireBase, dict[int, bytes], dict[str, bytes]]:
    """The base's wire form, and the subject's own values (serialized, by position) and nested entries."""
    wire = wire_base(subject_values.base)
    own = subject_values.own
    values = {wire.layout.position[key]: _value_piece(value) for key, value in own.items()}
    base_values, leaves = subject_values.base.values, wire.leaves
    entries = {
        segment: _nested_entry(
            {
                base_values[n].key: struct_value(own[base_values[n].key].value)
                if base_values[n].key in own
                else leaves[n]
                for n in wire.layout.segments[segment]
            }
        )
        for segment in {_segment(key) for key in own}
    }
    return wire, values, entries


def effective_kept(subject_values: SubjectValues) -> tuple[bytes | OwnBody, int]:
    """What to keep of a subject's GetEffectivePreferencesResponse body, and its size beyond the parts its
    org base holds: the base's body itself (nothing more), or an OwnBody."""
    if not subject_values.own:
        return wire_base(subject_values.base).body, 0
    wire, values, entries = _own_parts(subject_values)
    size = 200 + sum(len(p) + 100 for p in values.values()) + sum(len(e) + 100 for e in entries.values())
    return OwnBody(wire, values, entries, size), size


def effective_body(kept: bytes | OwnBody) -> bytes:
    """A GetEffectivePreferencesResponse without its cursor."""
    return kept if isinstance(kept, bytes) else kept.body()


def _assemble(subject_values: SubjectValues, fields: tuple[int, int]) -> list[Piece]:
    """A subject's values as field fields[0] and its nested object as field fields[1], in pieces to join."""
    if not subject_values.own:
        return [wire_base(subject_values.base).blob(fields)]
    wire, values, entries = _own_parts(subject_values)
    return wire.with_own(fields, values, entries)


def subject_preferences(subject: Subject, subject_values: SubjectValues) -> list[Piece]:
    """One SubjectPreferences message as field 1 of a BatchGetEffectivePreferencesResponse, in pieces to
    join (a subject without own values shares its org base's serialized values: no copy per subject)."""
    head = field(1, common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id).SerializeToString())
    values = _assemble(subject_values, _SUBJECT_FIELDS)
    size = len(head) + sum(map(len, values))
    return [_BATCH_RESULT_TAG + varint(size) + head, *values]


def batch_body(results: Sequence[list[Piece]], cursor: bytes) -> bytes:
    """A BatchGetEffectivePreferencesResponse from the pieces of its SubjectPreferences and the serialized
    cursor field, joined once."""
    return b"".join([*itertools.chain.from_iterable(results), cursor])
