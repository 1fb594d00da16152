/** Preference values as plain JavaScript values, and back. */

import type { JsonObject, JsonValue } from "@bufbuild/protobuf";

import type { TypedValue } from "./gen/prefd/v1/common_pb.js";

/**
 * A preference value: bool, int (a number, or a bigint beyond 2^53), double, string (and enum),
 * string list, or JSON object.
 */
export type PreferenceValue = boolean | number | bigint | string | string[] | JsonObject;

/** A TypedValue as a plain value (undefined when unset). */
export function typedValue(value: TypedValue | undefined): PreferenceValue | undefined {
  const kind = value?.kind;
  switch (kind?.case) {
    case "boolValue":
    case "doubleValue":
    case "stringValue":
      return kind.value;
    case "intValue":
      return kind.value >= BigInt(Number.MIN_SAFE_INTEGER) && kind.value <= BigInt(Number.MAX_SAFE_INTEGER)
        ? Number(kind.value)
        : kind.value;
    case "stringListValue":
      return [...kind.value.values];
    case "jsonValue":
      return kind.value;
    default:
      return undefined;
  }
}

/**
 * A plain value as a TypedValue (for SetPreferences): a boolean, a bigint or whole number as an
 * int (prefd widens an int to a double for DOUBLE keys), any other number as a double, a string,
 * an array of strings as a string list, a plain object as JSON. TypeError for anything else.
 */
export function toTypedValue(value: PreferenceValue): TypedValue {
  return { $typeName: "prefd.v1.TypedValue", kind: kindOf(value) };
}

function kindOf(value: PreferenceValue): TypedValue["kind"] {
  switch (typeof value) {
    case "boolean":
      return { case: "boolValue", value };
    case "bigint":
      return { case: "intValue", value };
    case "number":
      if (!Number.isFinite(value)) {
        throw new TypeError(`${value} is not a value prefd can store`);
      }
      return Number.isInteger(value) ? { case: "intValue", value: BigInt(value) } : { case: "doubleValue", value };
    case "string":
      return { case: "stringValue", value };
    case "object":
      if (Array.isArray(value)) {
        if (!value.every((item) => typeof item === "string")) {
          throw new TypeError("a string list holds strings only");
        }
        return { case: "stringListValue", value: { $typeName: "prefd.v1.StringList", values: [...value] } };
      }
      if (value !== null && Object.getPrototypeOf(value) === Object.prototype) {
        return { case: "jsonValue", value };
      }
  }
  throw new TypeError(`${String(value)} is not a value prefd can store (bool, number, bigint, string, string[], object)`);
}

/** Deep equality of two preference values (lists and JSON objects by content). */
export function sameValue(a: PreferenceValue | JsonValue | undefined, b: PreferenceValue | JsonValue | undefined): boolean {
  if (a === b) {
    return true;
  }
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) {
    return false;
  }
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((item, i) => sameValue(item, b[i]));
  }
  const aKeys = Object.keys(a);
  const bObject = b as JsonObject;
  return (
    aKeys.length === Object.keys(bObject).length &&
    aKeys.every((key) => Object.hasOwn(bObject, key) && sameValue((a as JsonObject)[key], bObject[key]))
  );
}

