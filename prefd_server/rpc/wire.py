"""Protobuf wire pieces for responses assembled from serialized parts.

Parsing merges a message's fields however its bytes are split, and a repeated field or a map is its
entries one after another: a response can be joined from parts serialized once and shared. These helpers
write the few wire forms prefd assembles by hand; a test compares each with protobuf's own serialization.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

_DOUBLE = struct.Struct("<d")

# google.protobuf.Value's fields, each tag with its wire type.
_NULL_VALUE = b"\x08\x00"  # field 1, varint NULL_VALUE (0)
_NUMBER_TAG = b"\x11"  # field 2, 64-bit
_STRING_TAG = 3
_BOOL_FALSE = b"\x20\x00"  # field 4, varint
_BOOL_TRUE = b"\x20\x01"
_STRUCT_TAG = 5
_LIST_TAG = 6


def varint(number: int) -> bytes:
    """An unsigned varint."""
    if number <= 0x7F:
        return bytes((number,))
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, string or bytes) with its tag."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def struct_value(value: Any) -> bytes:
    """A JSON value as a serialized google.protobuf.Value (numbers as doubles, as Struct.update makes them).
    A `bytes` value is a Value serialized already (a part many messages share) and is taken as it is."""
    kind = type(value)
    if kind is bytes:
        return value  # type: ignore[no-any-return]
    if kind is str:
        return field(_STRING_TAG, value.encode())
    if value is None:
        return _NULL_VALUE
    if kind is bool:
        return _BOOL_TRUE if value else _BOOL_FALSE
    if kind is dict:
        return field(_STRUCT_TAG, struct_fields(value))
    if kind is int or kind is float:
        return _NUMBER_TAG + _DOUBLE.pack(value)
    if kind is list:
        return field(_LIST_TAG, b"".join([field(1, struct_value(item)) for item in value]))
    return struct_value(_as_json_kind(value))


def _as_json_kind(value: Any) -> Any:
    """A subclass of a JSON kind, another mapping or a tuple, as the plain JSON kind it stands for."""
    kinds: tuple[type[Any], ...] = (bool, str, int, float, dict, list)  # bool before int: True is an int too
    for kind in kinds:
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def struct_fields(fields: Mapping[str, Any]) -> bytes:
    """A JSON object as a serialized google.protobuf.Struct (its map entries one after another)."""
    return b"".join(
        [field(1, field(1, name.encode()) + field(2, struct_value(value))) for name, value in fields.items()]
    )
