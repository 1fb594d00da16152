/**
 * Typed errors: every failed prefd call rejects with a PrefdError carrying the gRPC status code,
 * the stable ErrorInfo `reason` and the BadRequest field violations, decoded from
 * `grpc-status-details-bin`.
 */

import { createRegistry, isMessage } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** The google.rpc detail types prefd sends with its errors. */
const DETAILS = createRegistry(ErrorInfoSchema, BadRequestSchema);

/** A status code's canonical gRPC name: `Code.InvalidArgument` -> "INVALID_ARGUMENT". */
export function codeName(code: Code): string {
  const name = Code[code] as string | undefined;
  return name === undefined ? `CODE_${code}` : name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * A failed prefd call: the gRPC status `code` (Connect's Code enum, the same numbers as gRPC's),
 * the server's `rawMessage`, the stable `reason` (ErrorInfo), `errorMetadata` (ErrorInfo's
 * metadata), `violations` (BadRequest: field -> what is wrong) and the response `metadata`.
 * The ConnectError it came from, if any, is its `cause`.
 */
export class PrefdError extends Error {
  /** The gRPC status code. */
  readonly code: Code;
  /** The server's message, without the code. */
  readonly rawMessage: string;
  /** ErrorInfo.reason: a stable identifier of the cause ("" when the server sent none). */
  readonly reason: string;
  /** ErrorInfo.metadata. */
  readonly errorMetadata: Readonly<Record<string, string>>;
  /** BadRequest field violations: the offending field's path -> what is wrong with it. */
  readonly violations: Readonly<Record<string, string>>;
  /** Response headers and trailers of the failed call. */
  readonly metadata: Headers;

  constructor(
    message: string,
    code: Code,
    options: {
      reason?: string;
      errorMetadata?: Record<string, string>;
      violations?: Record<string, string>;
      metadata?: Headers;
      cause?: unknown;
    } = {},
  ) {
    super(`${codeName(code)}: ${message}`, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.rawMessage = message;
    this.reason = options.reason ?? "";
    this.errorMetadata = Object.freeze({ ...options.errorMetadata });
    this.violations = Object.freeze({ ...options.violations });
    this.metadata = options.metadata ?? new Headers();
  }

  /** The status code's canonical name, e.g. "PERMISSION_DENIED". */
  get codeName(): string {
    return codeName(this.code);
  }

  /** The typed error for anything a call threw (a ConnectError's status details decoded). */
  static from(reason: unknown, code: Code = Code.Unknown): PrefdError {
    if (reason instanceof PrefdError) {
      return reason;
    }
    const error = ConnectError.from(reason, code);
    let reasonText = "";
    let errorMetadata: Record<string, string> = {};
    const violations: Record<string, string> = {};
    for (const detail of error.findDetails(DETAILS)) {
      if (isMessage(detail, ErrorInfoSchema)) {
        reasonText = detail.reason;
        errorMetadata = { ...detail.metadata };
      } else if (isMessage(detail, BadRequestSchema)) {
        for (const violation of detail.fieldViolations) {
          violations[violation.field] = violation.description;
        }
      }
    }
    return new PrefdError(error.rawMessage, error.code, {
      reason: reasonText,
      errorMetadata,
      violations,
      metadata: error.metadata,
      cause: reason,
    });
  }
}

/** A read from a view told to raise while it has had no healthy stream for its grace period. */
export class StaleViewError extends PrefdError {
  constructor(seconds: number) {
    super(`no healthy stream for ${seconds.toFixed(1)} s`, Code.Unavailable, { reason: "VIEW_STALE" });
  }
}
