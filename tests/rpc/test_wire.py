"""Hand-assembled wire forms parse to exactly what protobuf's own messages hold."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from prefd.v1 import common_pb2
from prefd_server.rpc.wire import field, struct_fields, struct_value, varint

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
_json = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=16), _json, max_size=8))
def test_struct_fields_parse_as_struct_update_builds_them(doc: dict[str, Any]) -> None:
    expected = struct_pb2.Struct()
    expected.update(doc)
    assert struct_pb2.Struct.FromString(struct_fields(doc)) == expected


@given(_json)
def test_struct_value_parses_as_the_same_value(value: Any) -> None:
    expected = struct_pb2.Struct()
    expected.update({"v": value})
    assert struct_pb2.Value.FromString(struct_value(value)) == expected.fields["v"]


def test_falsy_values_keep_their_kind() -> None:
    """A oneof member is on the wire even when it holds its zero value: 0, False, "" and null stay apart."""
    kinds = [struct_pb2.Value.FromString(struct_value(v)).WhichOneof("kind") for v in (0, False, "", None, [], {})]
    assert kinds == ["number_value", "bool_value", "string_value", "null_value", "list_value", "struct_value"]


def test_a_value_that_is_not_json_is_refused() -> None:
    with pytest.raises(TypeError, match="not a JSON value: set"):
        struct_value({"a": {1, 2}})


@given(st.integers(min_value=0, max_value=2**64 - 1), st.text(max_size=300))
def test_fields_and_varints_parse_as_protobuf_writes_them(number: int, text: str) -> None:
    # Subject.user_id is field 1 and org_id field 2 (strings); a varint is what prefixes every length.
    message = common_pb2.Subject(user_id=text, org_id=text[::-1])
    assert common_pb2.Subject.FromString(field(1, text.encode()) + field(2, text[::-1].encode())) == message
    decoded, shift = 0, 0
    for byte in varint(number):
        decoded |= (byte & 0x7F) << shift
        shift += 7
    assert decoded == number and len(varint(number)) == max(1, (number.bit_length() + 6) // 7)


def test_subclasses_and_other_containers_serialize_as_their_json_kind() -> None:
    class Name(str):
        pass

    expected = struct_pb2.Struct()
    expected.update({"v": {"a": ["x", 1.5, True]}})
    odd = {"a": (Name("x"), 1.5, True)}
    assert struct_pb2.Value.FromString(struct_value(odd)) == expected.fields["v"]


def test_a_serialized_value_is_taken_as_it_is() -> None:
    leaf = struct_value(["shared", 2])
    assert struct_pb2.Struct.FromString(struct_fields({"a": {"b": leaf}})) == struct_pb2.Struct.FromString(
        struct_fields({"a": {"b": ["shared", 2]}})
    )
