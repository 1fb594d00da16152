/**
 * An OpenFeature provider answered from prefd's live views, in memory (`prefd-client/openfeature`;
 * needs `@openfeature/server-sdk`, which the package's root entry never loads).
 *
 *     import { OpenFeature } from "@openfeature/server-sdk";
 *     import { PrefdProvider } from "prefd-client/openfeature";
 *
 *     await OpenFeature.setProviderAndWait(new PrefdProvider({ target: "localhost:50051", token }));
 *     const flags = OpenFeature.getClient();
 *     await flags.getBooleanValue("notifications.email.enabled", false, { targetingKey: "alice", org: "acme" });
 *
 * A flag is a prefd key; the evaluation context's `targetingKey` is the user id and its `org`
 * attribute the org id. The provider keeps one live view (snapshot, then watch) per subject, opened
 * on the subject's first evaluation (which waits for the snapshot, within `timeoutMs`) and closed
 * when `maxViews` newer subjects have been evaluated since its last one. Every later evaluation of
 * the subject is answered from memory.
 *
 * Reasons come from provenance: DEFAULT (the definition's default), STATIC (a GLOBAL value),
 * TARGETING_MATCH (an ORG or USER value), SPLIT (a rollout's variant, named in `variant`), STALE (the
 * view has had no healthy stream for `graceMs`: its last values are served). `flagMetadata` carries
 * the value's layer, scope, version, updatedBy and updatedAt, and the view's cursor.
 *
 * Events: PROVIDER_READY (from the SDK once initialized, and from the provider after a recovery),
 * PROVIDER_CONFIGURATION_CHANGED with the changed keys (`flagsChanged`) and the subject (`metadata`),
 * PROVIDER_STALE while a view is stale, PROVIDER_ERROR when the server cannot be reached or refuses
 * the token. A refused token at `initialize` is PROVIDER_FATAL; a subject the token may not read
 * answers GENERAL (the subject's own error, not the provider's); an invalid subject INVALID_CONTEXT.
 */

import {
  ErrorCode,
  GeneralError,
  InvalidContextError,
  OpenFeatureEventEmitter,
  ProviderEvents,
  ProviderFatalError,
  StandardResolutionReasons,
  type EvaluationContext,
  type FlagMetadata,
  type JsonValue,
  type OpenFeatureError,
  type Provider,
  type ResolutionDetails,
  type ResolutionReason,
} from "@openfeature/server-sdk";
import { Code } from "@connectrpc/connect";
import { timestampDate } from "@bufbuild/protobuf/wkt";

import { createPrefdClient, type PrefdClient, type PrefdClientOptions } from "./client.js";
import { PrefdError } from "./errors.js";
import { Layer, ScopeKind, type Provenance } from "./gen/prefd/v1/common_pb.js";
import type { PreferenceValue } from "./values.js";
import { PreferencesView, type BackoffOptions, type KeyChange, type ViewLogger } from "./view.js";

/** What `new PrefdProvider(options)` takes: the client's options and the provider's own. */
export interface PrefdProviderOptions extends PrefdClientOptions {
  /** How many subjects' views stay open, least recently evaluated closed first (default 1,024). */
  maxViews?: number;
  /** The keys each view holds (every key when empty; other keys answer FLAG_NOT_FOUND). */
  keyPrefixes?: string[];
  /** How long `initialize` and a subject's first evaluation wait for prefd (default 5,000 ms);
   * also the client's `deadlineMs` unless that is given. */
  timeoutMs?: number;
  /** How long a view goes without a healthy stream before it is stale (default 5,000 ms). */
  graceMs?: number;
  /** How views reconnect. */
  backoff?: BackoffOptions;
  /** How long a subject whose view could not be opened answers that error before its next
   * evaluation tries again (default 1,000 ms). */
  retryFailedMs?: number;
  /** How often views are checked for staleness and recovery (default 250 ms). */
  healthCheckMs?: number;
  /** Where views report what they cannot throw (default: console). */
  logger?: ViewLogger;
}

/** Refusals that concern one subject, not the server or the token: that subject's evaluations
 * answer them, the provider stays READY for every other subject. */
const SUBJECT_ERRORS = new Set([Code.PermissionDenied, Code.InvalidArgument]);
/** A view that is stale because the server refuses its token or subject puts the provider in ERROR. */
const REFUSED = new Set([Code.Unauthenticated, Code.PermissionDenied]);
const REASONS: ReadonlyMap<Layer, ResolutionReason> = new Map([
  [Layer.DEFAULT, StandardResolutionReasons.DEFAULT],
  [Layer.GLOBAL, StandardResolutionReasons.STATIC],
  [Layer.ORG, StandardResolutionReasons.TARGETING_MATCH],
  [Layer.USER, StandardResolutionReasons.TARGETING_MATCH],
]);

/** The values one resolve method accepts and how it hands one out. */
interface FlagKind {
  readonly name: string;
  accepts(value: PreferenceValue): boolean;
  /** An object evaluation hands out a copy, so that changing the answer cannot change the view; a
   * number evaluation turns an int beyond 2^53 (a bigint) into the nearest number. */
  convert(value: PreferenceValue): unknown;
}

const BOOLEAN: FlagKind = {
  name: "boolean",
  accepts: (value) => typeof value === "boolean",
  convert: (value) => value,
};
const STRING: FlagKind = {
  name: "string",
  accepts: (value) => typeof value === "string",
  convert: (value) => value,
};
const NUMBER: FlagKind = {
  name: "number",
  accepts: (value) => typeof value === "number" || typeof value === "bigint",
  convert: (value) => Number(value),
};
const OBJECT: FlagKind = {
  name: "object (a JSON object or a string list)",
  accepts: (value) => typeof value === "object" && value !== null,
  convert: (value) => structuredClone(value),
};

function typeName(value: PreferenceValue): string {
  if (Array.isArray(value)) {
    return "string list";
  }
  switch (typeof value) {
    case "object":
      return "JSON object";
    case "bigint":
      return "number";
    default:
      return typeof value;
  }
}

function scopeName(source: Provenance): string {
  const scope = source.scope;
  if (scope === undefined || scope.kind === ScopeKind.UNSPECIFIED) {
    return "";
  }
  const kind = ScopeKind[scope.kind] ?? String(scope.kind);
  return scope.id ? `${kind}:${scope.id}` : kind;
}

/** What an answer takes from a value's provenance, worked out once per provenance message (the view
 * replaces the message when the value changes, never edits it). */
interface Answer {
  readonly source: Provenance;
  readonly reason: ResolutionReason;
  readonly variant: string | undefined;
  /** Everything but the cursor, which moves without the value. */
  readonly metadata: FlagMetadata;
}

function answerOf(source: Provenance): Answer {
  const variant = source.rollout?.variant || undefined;
  const metadata: Record<string, string | number> = {
    layer: Layer[source.layer] ?? String(source.layer),
    scope: scopeName(source),
    version: Number(source.version),
    updatedBy: source.updatedBy,
  };
  if (source.updatedAt !== undefined) {
    metadata.updatedAt = timestampDate(source.updatedAt).toISOString();
  }
  const reason =
    variant !== undefined
      ? StandardResolutionReasons.SPLIT
      : (REASONS.get(source.layer) ?? StandardResolutionReasons.UNKNOWN);
  return { source, reason, variant, metadata };
}

/** The default value with an error, as the OpenFeature specification asks of a failed resolution. */
function failed<T>(value: T, errorCode: ErrorCode, errorMessage: string): ResolutionDetails<T> {
  return { value, errorCode, errorMessage, reason: StandardResolutionReasons.ERROR };
}

/** A prefd error as the OpenFeature error `initialize` and `warm` reject with (the PrefdError its cause). */
function openFeatureError(error: PrefdError): OpenFeatureError {
  if (error.code === Code.Unauthenticated) {
    return new ProviderFatalError(`prefd refused the token: ${error.message}`, { cause: error });
  }
  if (error.code === Code.InvalidArgument) {
    return new InvalidContextError(`prefd refused the subject: ${error.message}`, { cause: error });
  }
  return new GeneralError(error.message, { cause: error });
}

/** The error code of an evaluation whose subject's view could not be opened. */
function errorCodeOf(error: PrefdError): ErrorCode {
  return error.code === Code.InvalidArgument ? ErrorCode.INVALID_CONTEXT : ErrorCode.GENERAL;
}

/** One subject's view: opening (`view` and `error` undefined), open (`view`) or failed (`error`). */
class Subject {
  view: PreferencesView | undefined;
  error: PrefdError | undefined;
  failedAt = 0;
  /** The view being opened (closed by a shutdown while it opens). */
  pending: PreferencesView | undefined;
  /** Settles (never rejects) once the view is open or has failed. */
  opened: Promise<void> = Promise.resolve();
  /** Let go (by the LRU bound or a shutdown): a view that opens after this closes itself. */
  released = false;
  /** Per key evaluated: what its answers take from its provenance (at most the view's keys). */
  readonly answers = new Map<string, Answer>();

  constructor(
    readonly key: string,
    readonly userId: string,
    readonly orgId: string,
  ) {}
}

type State = "ready" | "stale" | "error";

/**
 * OpenFeature flags from prefd: each evaluation is answered from the subject's live view. Throws
 * TypeError / RangeError for options it cannot work with.
 */
export class PrefdProvider implements Provider {
  readonly metadata = { name: "prefd" } as const;
  readonly runsOn = "server";
  readonly events = new OpenFeatureEventEmitter();

  private readonly clientOptions: PrefdClientOptions;
  private readonly maxViews: number;
  private readonly keyPrefixes: string[];
  private readonly timeoutMs: number;
  private readonly graceMs: number;
  private readonly backoff: BackoffOptions | undefined;
  private readonly retryFailedMs: number;
  private readonly healthCheckMs: number;
  private readonly logger: ViewLogger | undefined;
  /** The client while initialized (undefined before `initialize` and after `onClose`). */
  private client: PrefdClient | undefined;
  /** The client made by the constructor, not yet connected (it checks the client options). */
  private idleClient: PrefdClient | undefined;
  /** Subjects by key, least recently evaluated first. */
  private readonly held = new Map<string, Subject>();
  private mostRecent: Subject | undefined;
  /** Evicted views being closed. */
  private readonly closing = new Set<Promise<void>>();
  private monitor: NodeJS.Timeout | undefined;
  /** The state last announced, and the last failure to reach the server or to be accepted by it
   * (cleared by the next view that opens). */
  private announced: State = "ready";
  private serverError: PrefdError | undefined;

  constructor(options: PrefdProviderOptions) {
    const {
      maxViews = 1_024,
      keyPrefixes = [],
      timeoutMs = 5_000,
      graceMs = 5_000,
      backoff,
      retryFailedMs = 1_000,
      healthCheckMs = 250,
      logger,
      ...clientOptions
    } = options;
    if (!Number.isInteger(maxViews) || maxViews < 1) {
      throw new RangeError(`maxViews must be a whole number of at least 1 (got ${String(maxViews)})`);
    }
    if (!Array.isArray(keyPrefixes) || !keyPrefixes.every((prefix) => typeof prefix === "string")) {
      throw new TypeError("keyPrefixes is an array of prefixes (strings)");
    }
    for (const [name, ms] of Object.entries({ timeoutMs, graceMs, retryFailedMs, healthCheckMs })) {
      if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0 || ms >= 86_400_000) {
        throw new RangeError(`${name} must be a number of milliseconds above 0 and below a day (got ${String(ms)})`);
      }
    }
    this.clientOptions = { ...clientOptions, deadlineMs: clientOptions.deadlineMs ?? timeoutMs };
    this.maxViews = maxViews;
    this.keyPrefixes = [...keyPrefixes];
    this.timeoutMs = timeoutMs;
    this.graceMs = graceMs;
    this.backoff = backoff;
    this.retryFailedMs = retryFailedMs;
    this.healthCheckMs = healthCheckMs;
    this.logger = logger;
    this.idleClient = createPrefdClient(this.clientOptions); // refuses bad client options here
  }

  // --- OpenFeature provider -------------------------------------------------------------------

  /**
   * Connect and check that the server accepts the token (a one-definition catalog read), within
   * `timeoutMs`. Rejects with ProviderFatalError for a refused token, GeneralError otherwise (an
   * unreachable server); the provider then answers evaluations as usual (each new subject tries
   * again). A context with a `targetingKey` (the SDK's global context) opens that subject's view too.
   */
  async initialize(context?: EvaluationContext): Promise<void> {
    const client = (this.client ??= this.idleClient ?? createPrefdClient(this.clientOptions));
    this.idleClient = undefined;
    if (this.monitor === undefined) {
      this.monitor = setInterval(() => this.announce(), this.healthCheckMs);
      this.monitor.unref();
    }
    try {
      await client.preferences.listDefinitions({ pageSize: 1 }, { timeoutMs: this.timeoutMs });
    } catch (error) {
      const typed = PrefdError.from(error);
      this.serverError = typed;
      this.announced = "error";
      throw openFeatureError(typed);
    }
    this.serverError = undefined;
    this.announced = "ready";
    const subject = subjectOf(context);
    if (typeof subject !== "string") {
      try {
        await this.warm(subject.userId, subject.orgId);
      } catch {
        // The subject's own error: its evaluations answer it.
      }
    }
  }

  /** Close every view and the connection; `initialize` starts again. */
  async onClose(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    clearInterval(this.monitor);
    this.monitor = undefined;
    const subjects = [...this.held.values()];
    this.held.clear();
    this.mostRecent = undefined;
    for (const subject of subjects) {
      subject.released = true;
      void subject.pending?.close();
    }
    await Promise.all(subjects.map(async (subject) => {
      await subject.opened;
      await subject.view?.close();
    }));
    await Promise.all(this.closing);
    await client?.close();
  }

  resolveBooleanEvaluation(
    flagKey: string,
    defaultValue: boolean,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<boolean>> {
    return this.resolve(flagKey, defaultValue, context, BOOLEAN);
  }

  resolveStringEvaluation(
    flagKey: string,
    defaultValue: string,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<string>> {
    return this.resolve(flagKey, defaultValue, context, STRING);
  }

  resolveNumberEvaluation(
    flagKey: string,
    defaultValue: number,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<number>> {
    return this.resolve(flagKey, defaultValue, context, NUMBER);
  }

  resolveObjectEvaluation<T extends JsonValue>(
    flagKey: string,
    defaultValue: T,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<T>> {
    return this.resolve(flagKey, defaultValue, context, OBJECT);
  }

  // --- subjects --------------------------------------------------------------------------------

  /** The [userId, orgId] of every subject whose view is held, least recently evaluated first. */
  get subjects(): Array<[string, string]> {
    return [...this.held.values()].map((subject) => [subject.userId, subject.orgId]);
  }

  /**
   * Open a subject's view now (ahead of its first evaluation) and wait for its snapshot. Rejects with
   * the OpenFeature error the subject's evaluations would carry (GeneralError, InvalidContextError,
   * ProviderFatalError), the PrefdError its `cause`.
   */
  async warm(userId: string, orgId = ""): Promise<void> {
    const subject = this.subject(userId, orgId);
    if (subject === undefined) {
      throw new GeneralError("the provider is not initialized");
    }
    await subject.opened;
    if (subject.error !== undefined) {
      throw openFeatureError(subject.error);
    }
    if (subject.view === undefined) {
      throw new GeneralError("the provider was closed while the subject's view was opening");
    }
  }

  // --- evaluation ------------------------------------------------------------------------------

  private async resolve<T>(
    flagKey: string,
    defaultValue: T,
    context: EvaluationContext,
    kind: FlagKind,
  ): Promise<ResolutionDetails<T>> {
    const who = subjectOf(context);
    if (typeof who === "string") {
      const code = who.startsWith("the org") ? ErrorCode.INVALID_CONTEXT : ErrorCode.TARGETING_KEY_MISSING;
      return failed(defaultValue, code, who);
    }
    const subject = this.subject(who.userId, who.orgId);
    if (subject === undefined) {
      return failed(defaultValue, ErrorCode.PROVIDER_NOT_READY, "the provider is not initialized");
    }
    const opening = subject.view === undefined && subject.error === undefined;
    if (opening && !(await settlesWithin(subject.opened, this.timeoutMs))) {
      const message = `the subject's view did not open within ${this.timeoutMs} ms`;
      return failed(defaultValue, ErrorCode.PROVIDER_NOT_READY, message);
    }
    return answer(subject, flagKey, defaultValue, kind);
  }

  /**
   * The subject's entry, marked most recently evaluated; a new subject's view starts opening (and
   * the least recently evaluated beyond `maxViews` close); a failed one is tried again after
   * `retryFailedMs`. Undefined before `initialize` and after `onClose`.
   */
  private subject(userId: string, orgId: string): Subject | undefined {
    const client = this.client;
    if (client === undefined) {
      return undefined;
    }
    let subject = this.mostRecent;
    if (subject !== undefined && subject.userId === userId && subject.orgId === orgId) {
      // The common case, one subject evaluated several times in a row: nothing to reorder.
    } else {
      const key = `${userId}\u0000${orgId}`;
      subject = this.held.get(key);
      if (subject !== undefined) {
        this.held.delete(key);
        this.held.set(key, subject);
      } else {
        subject = new Subject(key, userId, orgId);
        this.held.set(key, subject);
        this.evict();
        subject.opened = this.open(subject, client);
      }
      this.mostRecent = subject;
    }
    if (subject.error !== undefined && performance.now() - subject.failedAt >= this.retryFailedMs) {
      subject.error = undefined;
      subject.opened = this.open(subject, client);
    }
    return subject;
  }

  private evict(): void {
    for (const [key, subject] of this.held) {
      if (this.held.size <= this.maxViews) {
        return;
      }
      this.held.delete(key);
      subject.released = true;
      const view = subject.view;
      if (view !== undefined) {
        // One still opening closes itself once open (its waiting evaluations answer from its snapshot).
        const closed = view.close().finally(() => this.closing.delete(closed));
        this.closing.add(closed);
      }
    }
  }

  /** Open the subject's view; settles (never rejects) with `view` or `error` set. */
  private async open(subject: Subject, client: PrefdClient): Promise<void> {
    const view = new PreferencesView(
      client.preferences,
      { userId: subject.userId, orgId: subject.orgId },
      {
        keyPrefixes: this.keyPrefixes,
        graceMs: this.graceMs,
        raiseWhenStale: false,
        openTimeoutMs: this.timeoutMs,
        ...(this.backoff === undefined ? {} : { backoff: this.backoff }),
        ...(this.logger === undefined ? {} : { logger: this.logger }),
      },
    );
    view.onChange((changes) => this.changed(subject, view, changes));
    subject.pending = view;
    try {
      await view.start();
    } catch (error) {
      const typed = PrefdError.from(error);
      subject.error = typed;
      subject.failedAt = performance.now();
      if (!SUBJECT_ERRORS.has(typed.code) && this.client === client) {
        this.serverError = typed;
        this.announce();
      }
      return;
    } finally {
      subject.pending = undefined;
    }
    subject.view = view;
    if (subject.released || this.client !== client) {
      await view.close();
      return;
    }
    this.serverError = undefined;
    this.announce();
  }

  private changed(subject: Subject, view: PreferencesView, changes: KeyChange[]): void {
    if (view.snapshots === 1 && view.changesApplied === 0) {
      return; // the view's first snapshot: nothing changed for anyone evaluating it
    }
    this.events.emit(ProviderEvents.ConfigurationChanged, {
      flagsChanged: [...new Set(changes.map((change) => change.key))].sort(),
      metadata: { targetingKey: subject.userId, org: subject.orgId },
    });
  }

  // --- health ----------------------------------------------------------------------------------

  /** Emit an event when the provider's state (the worst of its views' and of the last open) changed. */
  private announce(): void {
    if (this.client === undefined) {
      return;
    }
    const views = [...this.held.values()].flatMap((subject) => (subject.view === undefined ? [] : [subject.view]));
    const stale = views.filter((view) => view.stale);
    const refused = stale.filter((view) => view.lastError !== undefined && REFUSED.has(view.lastError.code));
    const failing = this.serverError !== undefined || refused.length > 0;
    const state: State = failing ? "error" : stale.length > 0 ? "stale" : "ready";
    if (state === this.announced) {
      return;
    }
    this.announced = state;
    if (state === "ready") {
      this.events.emit(ProviderEvents.Ready, { message: "every view is live" });
    } else if (state === "stale") {
      this.events.emit(ProviderEvents.Stale, {
        message: `${stale.length} of ${views.length} views have had no healthy stream for ${this.graceMs} ms`,
        metadata: { staleViews: stale.length },
      });
    } else {
      const error = this.serverError ?? refused[0]?.lastError;
      const message = error?.message ?? "prefd failed";
      this.events.emit(ProviderEvents.Error, { message, errorCode: ErrorCode.GENERAL });
    }
  }
}

/** The subject an evaluation context names, or why it names none. */
function subjectOf(context: EvaluationContext | undefined): { userId: string; orgId: string } | string {
  const userId = context?.targetingKey;
  if (typeof userId !== "string" || userId === "") {
    return "the evaluation context has no targetingKey (the user id)";
  }
  const orgId = context?.org ?? "";
  if (typeof orgId !== "string") {
    return `the org attribute must be a string, not ${orgId === null ? "null" : typeof orgId}`;
  }
  return { userId, orgId };
}

function answer<T>(subject: Subject, flagKey: string, defaultValue: T, kind: FlagKind): ResolutionDetails<T> {
  const view = subject.view;
  if (view === undefined) {
    const error = subject.error;
    return error === undefined
      ? failed(defaultValue, ErrorCode.PROVIDER_NOT_READY, "the subject's view is opening; evaluate again")
      : failed(defaultValue, errorCodeOf(error), error.message);
  }
  const value = view.get(flagKey);
  if (value === undefined) {
    return failed(defaultValue, ErrorCode.FLAG_NOT_FOUND, `prefd has no key ${JSON.stringify(flagKey)}`);
  }
  if (!kind.accepts(value)) {
    const message = `${JSON.stringify(flagKey)} is a ${typeName(value)}, not a ${kind.name}`;
    return failed(defaultValue, ErrorCode.TYPE_MISMATCH, message);
  }
  const converted = kind.convert(value) as T;
  const source = view.provenance(flagKey);
  if (source === undefined) {
    return { value: converted, reason: StandardResolutionReasons.UNKNOWN }; // a key the view holds always has one
  }
  let known = subject.answers.get(flagKey);
  if (known === undefined || known.source !== source) {
    known = answerOf(source);
    subject.answers.set(flagKey, known);
  }
  const details: ResolutionDetails<T> = {
    value: converted,
    reason: view.stale ? StandardResolutionReasons.STALE : known.reason,
    flagMetadata: { ...known.metadata, cursor: view.cursor },
  };
  if (known.variant !== undefined) {
    details.variant = known.variant;
  }
  return details;
}

/** True when `promise` settles within `ms`. */
async function settlesWithin(promise: Promise<void>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
