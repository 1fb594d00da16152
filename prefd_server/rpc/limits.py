"""The limits every request meets before its handler runs, walked from the message descriptors so
that each RPC, present and future, gets them: request size per method, text (no NUL or control
characters, a byte limit per field), numbers (finite, a bound per field), lists (counts), JSON
values (depth and size chosen so that every stored value encodes back through every read path),
timestamps and durations (representable ranges) and enums (known values only).

Handlers keep their domain rules (identifier patterns, ranges that depend on a definition); what
is here is what no handler should have to remember."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from prefd_server.kernel.errors import RequestTooLarge, ValidationFailed, invalid
from prefd_server.kernel.model import MAX_JSON_BYTES, FieldViolation

# --- request size -------------------------------------------------------------------------------
# Bytes of a serialized request. Reads and single-object calls stay small; bulk writes may carry
# many values (up to the server's 4 MiB transport limit).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_BYTES = 64 * 1024
REQUEST_BYTES = {
    "SetPreferences": MAX_REQUEST_BYTES,
    "BatchGetEffectivePreferences": 1024 * 1024,
    "Rollback": 256 * 1024,
    "PreviewRollback": 256 * 1024,
    "CreateDefinition": 256 * 1024,
    "UpdateDefinition": 256 * 1024,
    # An event's data may take 64 KiB (its own limit below names the field); a batch adds 1,000 subjects.
    "CreateTemplate": 256 * 1024,
    "UpdateTemplate": 256 * 1024,
    "Decide": 96 * 1024,
    "DecideBatch": 512 * 1024,
}

# --- text ---------------------------------------------------------------------------------------
# UTF-8 bytes of one string; by field name where it differs from the default.
DEFAULT_TEXT_BYTES = 4 * 1024
TEXT_BYTES = {
    "reason": 1024,
    "description": 4 * 1024,
    "page_token": 1024,
    "token": 1024,
    "request_id": 128,
    "user_id": 128,
    "org_id": 128,
    "id": 128,
    "key": 128,
    "keys": 128,
    "key_prefix": 128,
    "key_prefixes": 128,
    "category": 64,
    "categories": 64,
    "name": 128,
    "actor": 256,
    "target": 128,
    "paths": 128,
    # Notification events and the consent ledger.
    "prefd.v1.Event.category": 128,
    "event_type": 128,
    "idempotency_key": 128,
    "purpose": 128,
    "source": 128,
    "notice_version": 128,
    "proof_reference": 512,
    # Statistics' date ranges (YYYY-MM-DD).
    "start_date": 32,
    "end_date": 32,
}
# C0 controls (tab, line feed and carriage return allowed) and DEL: PostgreSQL refuses NUL in text and
# jsonb, and the rest break logs and terminals.
_FORBIDDEN_CHARS = frozenset(chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_FORBIDDEN_TABLE = {ord(c): None for c in _FORBIDDEN_CHARS}

# --- lists --------------------------------------------------------------------------------------
DEFAULT_LIST_ITEMS = 1000
LIST_ITEMS = {
    "writes": 500,
    "keys": 500,
    "subjects": 1000,
    "key_prefixes": 64,
    "categories": 64,
    "scopes": 100,
    "paths": 64,
    "allowed_values": 1000,
    "overridable_scopes": 3,
    "kinds": 16,
    "values": 1000,
    "features": 64,
    "channels": 16,
}

# --- numbers ------------------------------------------------------------------------------------
# Inclusive bounds by field name (documented in the protos); doubles must also be finite.
INT64_MAX = 2**63 - 1
DEFAULT_DOUBLE_BOUND = 1e15
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "expected_version": (0, 2**53),
    "page_size": (0, 1_000_000),
    "max_length": (0, 1_000_000),
    "min_value": (-DEFAULT_DOUBLE_BOUND, DEFAULT_DOUBLE_BOUND),
    "max_value": (-DEFAULT_DOUBLE_BOUND, DEFAULT_DOUBLE_BOUND),
    "priority": (-1_000_000, 1_000_000),
    "max_tokens": (0, 100_000_000),
    "requests_per_minute": (0, 1_000_000_000),
    "concurrent_requests": (0, 1_000_000_000),
    "burst_allowance": (0, 1_000_000_000),
    "max_retries": (0, 1_000),
    "base_delay_ms": (0, 86_400_000),
    "max_delay_ms": (0, 86_400_000),
    "generation_ms": (0, 86_400_000),
    "connection_ms": (0, 86_400_000),
    "total_ms": (0, 86_400_000),
    "daily_usd": (0, 1_000_000_000),
    "weekly_usd": (0, 1_000_000_000),
    "monthly_usd": (0, 1_000_000_000),
    "context_window": (0, 100_000_000),
    "output_limit": (0, 100_000_000),
    "input_tokens": (0, 1_000_000_000),
    "output_tokens": (0, 1_000_000_000),
    "input_usd_per_1k": (0, 1_000_000),
    "output_usd_per_1k": (0, 1_000_000),
    "change_id": (0, INT64_MAX),
    "top_n": (0, 100),
}
# JSON numbers and typed double values: any finite double.
_UNBOUNDED_DOUBLES = frozenset({"google.protobuf.Value.number_value", "prefd.v1.TypedValue.double_value"})

# --- structure ----------------------------------------------------------------------------------
# Nesting of JSON containers (objects and lists) in one value. Each level costs three protobuf
# levels in responses (Value, Struct, map entry), and a response adds a few more plus the key's
# segments in `nested` views: 16 keeps every read, watch and export path far below protobuf's
# decoding limit of 100.
MAX_JSON_DEPTH = 16
# Nesting of ordinary (non-JSON) messages in a request.
MAX_MESSAGE_DEPTH = 16
# At most this many violations are reported for one request.
MAX_VIOLATIONS = 20

# google.protobuf.Timestamp's documented range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# google.protobuf.Duration's documented range: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000

_JSON_TYPES = frozenset({"google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue"})


def request_limit(method: str) -> int:
    """The largest serialized request `method` (its short name) accepts."""
    return REQUEST_BYTES.get(method, DEFAULT_REQUEST_BYTES)


def check_request_size(method: str, size: int) -> None:
    """RESOURCE_EXHAUSTED if a serialized request of `size` bytes is over `method`'s limit."""
    limit = request_limit(method)
    if size > limit:
        raise RequestTooLarge(size, limit)


def parse_request(raw: bytes, parse: Callable[[bytes], Any], method: str) -> Any:
    """A request of `method` (its short name) parsed from its bytes and checked against the input
    limits; INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for size) when it is not acceptable."""
    check_request_size(method, len(raw))
    try:
        request = parse(raw)
    except DecodeError as exc:
        raise invalid("request", f"is not a valid {method} request (malformed or nested too deeply)") from exc
    check_request(request)
    return request


def check_request(message: Message) -> None:
    """INVALID_ARGUMENT naming every field (up to MAX_VIOLATIONS) that breaks a limit."""
    violations: list[FieldViolation] = []
    for violation in _message_violations(message, "", 0):
        violations.append(violation)
        if len(violations) >= MAX_VIOLATIONS:
            break
    if violations:
        raise ValidationFailed(violations)


def text_problem(value: str, limit: int = DEFAULT_TEXT_BYTES) -> str | None:
    """Why `value` cannot be stored or logged as text, or None."""
    if len(value) > limit or len(value.encode()) > limit:
        return f"must be at most {limit} bytes"
    if not value.isprintable() and value.translate(_FORBIDDEN_TABLE) != value:
        return "must not contain NUL or control characters"
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _message_violations(message: Message, path: str, depth: int) -> Iterator[FieldViolation]:
    full_name = message.DESCRIPTOR.full_name
    if full_name in _JSON_TYPES:
        yield from _json_violations(message, path)
        return
    if full_name == "google.protobuf.Timestamp":
        yield from _timestamp_violations(message, path)
        return
    if full_name == "google.protobuf.Duration":
        yield from _duration_violations(message, path)
        return
    if depth > MAX_MESSAGE_DEPTH:
        yield FieldViolation(path or "request", f"is nested more than {MAX_MESSAGE_DEPTH} levels")
        return
    for field, value in message.ListFields():
        name = _join(path, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield from _map_violations(field, value, name, depth)
        elif field.is_repeated:
            limit = LIST_ITEMS.get(field.name, DEFAULT_LIST_ITEMS)
            if len(value) > limit:
                yield FieldViolation(name, f"must have at most {limit} items (got {len(value)})")
                continue
            for i, item in enumerate(value):
                yield from _value_violations(field, item, f"{name}[{i}]", depth)
        else:
            yield from _value_violations(field, value, name, depth)


def _map_violations(field: FieldDescriptor, value: object, path: str, depth: int) -> Iterator[FieldViolation]:
    entries = value  # a protobuf map container
    if len(entries) > DEFAULT_LIST_ITEMS:  # type: ignore[arg-type]
        yield FieldViolation(path, f"must have at most {DEFAULT_LIST_ITEMS} entries")
        return
    entry_type = field.message_type
    assert entry_type is not None
    key_field, value_field = entry_type.fields_by_name["key"], entry_type.fields_by_name["value"]
    for key, item in entries.items():  # type: ignore[attr-defined]
        yield from _value_violations(key_field, key, f"{path}[{key!r}]", depth)
        yield from _value_violations(value_field, item, f"{path}[{key!r}]", depth)


def _text_limit(field: FieldDescriptor) -> int:
    """A text field's byte limit: by its full name (one message's field), else by its name, else the default."""
    return TEXT_BYTES.get(field.full_name) or TEXT_BYTES.get(field.name, DEFAULT_TEXT_BYTES)


def _value_violations(field: FieldDescriptor, value: object, path: str, depth: int) -> Iterator[FieldViolation]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        yield from _message_violations(value, path, depth + 1)  # type: ignore[arg-type]
    elif kind == FieldDescriptor.TYPE_STRING:
        problem = text_problem(value, _text_limit(field))  # type: ignore[arg-type]
        if problem:
            yield FieldViolation(path, problem)
    elif kind == FieldDescriptor.TYPE_BYTES:
        limit = _text_limit(field)
        if len(value) > limit:  # type: ignore[arg-type]
            yield FieldViolation(path, f"must be at most {limit} bytes")
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number):
            yield FieldViolation(path, "must be a finite number")
        elif field.full_name not in _UNBOUNDED_DOUBLES:
            yield from _bound_violations(field, number, path, DEFAULT_DOUBLE_BOUND)
    elif kind == FieldDescriptor.TYPE_ENUM:
        enum_type = field.enum_type
        assert enum_type is not None
        if enum_type.values_by_number.get(value) is None:  # type: ignore[call-overload]
            yield FieldViolation(path, f"is not a known {enum_type.name} value")
    elif kind != FieldDescriptor.TYPE_BOOL:
        yield from _bound_violations(field, int(value), path, None)  # type: ignore[call-overload]


def _bound_violations(
    field: FieldDescriptor, number: float, path: str, default: float | None
) -> Iterator[FieldViolation]:
    bounds = NUMBER_BOUNDS.get(field.name)
    if bounds is None:
        if default is None or -default <= number <= default:
            return
        bounds = (-default, default)
    low, high = bounds
    if not low <= number <= high:
        yield FieldViolation(path, f"must be between {_fmt(low)} and {_fmt(high)}")


def _fmt(number: float) -> str:
    return f"{int(number):,}" if float(number).is_integer() else str(number)


def _timestamp_violations(message: Message, path: str) -> Iterator[FieldViolation]:
    seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= nanos <= 999_999_999:
        yield FieldViolation(path, "must be a time between 0001-01-01 and 9999-12-31 (nanos 0..999,999,999)")


def _duration_violations(message: Message, path: str) -> Iterator[FieldViolation]:
    seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
    if (
        abs(seconds) > MAX_DURATION_SECONDS
        or abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        yield FieldViolation(path, "must be a duration within 10,000 years (nanos of the same sign)")


def _json_violations(message: Message, path: str) -> Iterator[FieldViolation]:
    """Depth, size and content of one JSON value (Value, Struct or ListValue)."""
    size = message.ByteSize()
    if size > MAX_JSON_BYTES:
        yield FieldViolation(path, f"must be at most {MAX_JSON_BYTES} bytes")
        return
    yield from _json_node(message, path, 0)


def _json_node(message: Message, path: str, depth: int) -> Iterator[FieldViolation]:
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Value":
        which = message.WhichOneof("kind")
        if which == "number_value":
            if not math.isfinite(message.number_value):  # type: ignore[attr-defined]
                yield FieldViolation(path, "JSON numbers must be finite")
        elif which == "string_value":
            problem = text_problem(message.string_value)  # type: ignore[attr-defined]
            if problem:
                yield FieldViolation(path, problem)
        elif which in ("struct_value", "list_value"):
            yield from _json_node(getattr(message, which), path, depth)
        return
    if depth >= MAX_JSON_DEPTH:
        yield FieldViolation(path, f"JSON must not nest more than {MAX_JSON_DEPTH} levels")
        return
    if name == "google.protobuf.Struct":
        for key, item in message.fields.items():  # type: ignore[attr-defined]
            problem = text_problem(key, 256)
            if problem:
                yield FieldViolation(f"{path}[{key!r}]", f"JSON keys {problem}")
            yield from _json_node(item, f"{path}[{key!r}]", depth + 1)
    else:
        for i, item in enumerate(message.values):  # type: ignore[attr-defined]
            yield from _json_node(item, f"{path}[{i}]", depth + 1)
