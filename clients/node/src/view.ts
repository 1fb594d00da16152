/**
 * Live local views: a snapshot (GetEffectivePreferences), then a watch (WatchPreferences) from the
 * snapshot's cursor, kept in memory.
 *
 * Reads (`get`, the typed getters, `provenance`, `asObject`, ...) never do I/O: they read maps that
 * only the view's own loop replaces or updates. The loop applies changes in feed order and never
 * to an older per-key version, resumes a broken stream from its cursor with exponential backoff
 * and full jitter, re-snapshots when the server answers `compacted` (the cursor is older than the
 * retained history) or `erased`, and marks the view stale after a grace period without a healthy
 * stream; a stale view keeps serving its last values unless told to throw.
 */

import { Code, type Client } from "@connectrpc/connect";

import { PrefdError, StaleViewError } from "./errors.js";
import { sleep } from "./timing.js";
import { sameValue, typedValue, type PreferenceValue } from "./values.js";
import { ChangeKind, type Provenance, type Scope } from "./gen/prefd/v1/common_pb.js";
import type {
  ChangeEvent,
  PreferencesService,
  WatchPreferencesResponse,
} from "./gen/prefd/v1/preferences_pb.js";

/** One key whose effective value changed as the view saw it; `old` / `new` are undefined when absent.
 * Each change event carries the key's effective value when it was sent, so changes replayed after
 * a reconnect (or replaced by a re-snapshot) arrive as one step to the latest value. */
export interface KeyChange {
  readonly key: string;
  readonly old: PreferenceValue | undefined;
  readonly new: PreferenceValue | undefined;
}

/** Reconnect delays: full jitter over an exponentially growing cap. */
export interface BackoffOptions {
  /** The first cap (default 50 ms). */
  initialMs?: number;
  /** The largest cap (default 2,000 ms). */
  maxMs?: number;
  /** How the cap grows per failed attempt (default 2). */
  multiplier?: number;
}

/** Where a view reports what it cannot throw to anyone: a failing listener, a refused resume. */
export interface ViewLogger {
  warn(message: string, error?: unknown): void;
  error(message: string, error?: unknown): void;
}

export interface PreferencesViewOptions {
  /** Only keys starting with one of these; every key when empty. */
  keyPrefixes?: string[];
  /** How long without a healthy stream before the view is stale (default 5,000 ms). */
  graceMs?: number;
  /** Make reads of a stale view throw StaleViewError instead of serving the last values. */
  raiseWhenStale?: boolean;
  /** Reconnect delays. */
  backoff?: BackoffOptions;
  /** How long `start()` waits for the watch to start (default: the client's deadline). */
  openTimeoutMs?: number;
  /** Default: console. */
  logger?: ViewLogger;
}

/** Refusals that retrying cannot cure while the token and subject stay the same. */
const FATAL = new Set([Code.Unauthenticated, Code.PermissionDenied, Code.InvalidArgument]);

type WatchMessage = WatchPreferencesResponse["message"];

/**
 * A subject's effective preferences, live. Create with `await client.preferencesView(userId, orgId)`.
 */
export class PreferencesView {
  /** Snapshots loaded (1 after start; one more per `compacted` / `erased`). */
  snapshots = 0;
  /** Times the watch was opened again after it broke or ended. */
  reconnects = 0;
  /** Change events applied (not counting those skipped as already reflected). */
  changesApplied = 0;
  /** The error that last broke the watch (undefined while it never broke). */
  lastError: PrefdError | undefined;

  private readonly prefixes: string[];
  private readonly graceMs: number;
  private readonly raiseWhenStale: boolean;
  private readonly backoff: Required<BackoffOptions>;
  private readonly openTimeoutMs: number;
  private readonly logger: ViewLogger;
  private values = new Map<string, PreferenceValue>();
  private sources = new Map<string, Provenance>();
  /** Highest version applied per (kind, scope, key): the view never goes back (until the user is
   * erased: their versions start again). */
  private readonly versions = new Map<string, bigint>();
  private readonly listeners = new Set<(changes: KeyChange[]) => void>();
  private readonly closeListeners: Array<() => void> = [];
  private position = "";
  private unhealthySince: number | undefined = performance.now();
  private readonly closing = new AbortController();
  private loop: Promise<void> | undefined;
  private startSettled = false;
  private resolveStarted!: () => void;
  private rejectStarted!: (error: PrefdError) => void;
  private readonly started: Promise<void>;

  constructor(
    private readonly client: Client<typeof PreferencesService>,
    private readonly subject: { userId: string; orgId: string },
    options: PreferencesViewOptions = {},
  ) {
    this.prefixes = [...(options.keyPrefixes ?? [])];
    this.graceMs = nonNegative("graceMs", options.graceMs ?? 5_000);
    this.raiseWhenStale = options.raiseWhenStale ?? false;
    this.backoff = {
      initialMs: nonNegative("backoff.initialMs", options.backoff?.initialMs ?? 50),
      maxMs: nonNegative("backoff.maxMs", options.backoff?.maxMs ?? 2_000),
      multiplier: nonNegative("backoff.multiplier", options.backoff?.multiplier ?? 2),
    };
    this.openTimeoutMs = nonNegative("openTimeoutMs", options.openTimeoutMs ?? 5_000);
    this.logger = options.logger ?? console;
    this.started = new Promise<void>((resolve, reject) => {
      this.resolveStarted = resolve;
      this.rejectStarted = reject;
    });
    this.started.catch(() => undefined); // start() reports it
  }

  // --- reads (no I/O) ----------------------------------------------------------------------

  /** The feed position every value in the view reflects. */
  get cursor(): string {
    return this.position;
  }

  /** True after the grace period without a healthy stream (the values may be behind). */
  get stale(): boolean {
    const since = this.unhealthySince;
    return since !== undefined && performance.now() - since > this.graceMs;
  }

  /** The effective value of `key` (`fallback` when the key is not defined). */
  get(key: string): PreferenceValue | undefined;
  get<T>(key: string, fallback: T): PreferenceValue | T;
  get<T>(key: string, fallback?: T): PreferenceValue | T | undefined {
    if (this.raiseWhenStale) {
      this.checkFresh();
    }
    const value = this.values.get(key);
    return value === undefined ? fallback : value;
  }

  /** The value as a boolean (`fallback` when undefined). */
  getBool(key: string, fallback = false): boolean {
    return Boolean(this.get(key, fallback));
  }

  /** The value as a number (`fallback` when undefined); a bigint beyond 2^53 loses precision. */
  getNumber(key: string, fallback = 0): number {
    return Number(this.get(key, fallback));
  }

  /** The value as a whole number (truncated; `fallback` when undefined). */
  getInt(key: string, fallback = 0): number {
    return Math.trunc(this.getNumber(key, fallback));
  }

  /** The value as a string (`fallback` when undefined). */
  getString(key: string, fallback = ""): string {
    const value = this.get(key, fallback);
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  /** A string list's items (empty when undefined). */
  getList(key: string): string[] {
    const value = this.get(key);
    return Array.isArray(value) ? [...value] : value === undefined ? [] : [String(value)];
  }

  /** Where the value comes from: layer, scope, version, time, actor. */
  provenance(key: string): Provenance | undefined {
    if (this.raiseWhenStale) {
      this.checkFresh();
    }
    return this.sources.get(key);
  }

  /** Every key, sorted. */
  keys(): string[] {
    if (this.raiseWhenStale) {
      this.checkFresh();
    }
    return [...this.values.keys()].sort();
  }

  /** Every key and its value. */
  asFlatObject(): Record<string, PreferenceValue> {
    if (this.raiseWhenStale) {
      this.checkFresh();
    }
    return Object.fromEntries(this.values);
  }

  /** Every value, nested by the dots of its key (`display.theme` -> {display: {theme: ...}}). */
  asObject(): Record<string, unknown> {
    const nested: Record<string, unknown> = {};
    for (const [key, value] of Object.entries(this.asFlatObject()).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      const parts = key.split(".");
      const leaf = parts.pop() as string;
      let node = nested;
      for (const part of parts) {
        const child = node[part];
        node = (typeof child === "object" && child !== null ? child : (node[part] = {})) as Record<string, unknown>;
      }
      node[leaf] = value;
    }
    return nested;
  }

  /**
   * Call `listener(changes)` after each applied change or re-snapshot that changed a value, with
   * each key's old and new value. Returns a function that removes the listener.
   */
  onChange(listener: (changes: KeyChange[]) => void): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  // --- lifecycle ---------------------------------------------------------------------------

  /**
   * Snapshot, then start the watch; resolves once the stream is live. Rejects with a PrefdError
   * (the client's `preferencesView()` calls this).
   */
  async start(): Promise<void> {
    if (this.loop !== undefined) {
      throw new PrefdError("the view has already been started", Code.FailedPrecondition);
    }
    await this.snapshot();
    this.loop = this.run();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new PrefdError(`the watch did not start within ${this.openTimeoutMs} ms`, Code.DeadlineExceeded)),
        this.openTimeoutMs,
      );
    });
    try {
      await Promise.race([this.started, timeout]);
    } catch (error) {
      await this.close();
      throw PrefdError.from(error);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stop watching (the values stay readable). */
  async close(): Promise<void> {
    if (!this.closing.signal.aborted) {
      this.closing.abort(new PrefdError("the view was closed", Code.Canceled));
      for (const listener of this.closeListeners.splice(0)) {
        listener();
      }
    }
    await this.loop;
  }

  /** Call `listener` once when the view is closed. */
  onClose(listener: () => void): void {
    if (this.closing.signal.aborted) {
      listener();
    } else {
      this.closeListeners.push(listener);
    }
  }

  private get closed(): boolean {
    return this.closing.signal.aborted;
  }

  private async run(): Promise<void> {
    let attempt = 0;
    let resnapshot = false;
    while (!this.closed) {
      let failed = false;
      const stream = new AbortController();
      const stop = (): void => stream.abort();
      this.closing.signal.addEventListener("abort", stop, { once: true });
      try {
        if (resnapshot) {
          await this.snapshot();
          resnapshot = false;
        }
        const responses = this.client.watchPreferences(
          {
            target: { case: "subject", value: { userId: this.subject.userId, orgId: this.subject.orgId } },
            keyPrefixes: this.prefixes,
            startCursor: { token: this.position },
          },
          { signal: stream.signal },
        );
        for await (const response of responses) {
          const message = response.message;
          if (message.case === "started") {
            this.healthy();
            attempt = 0;
          } else if (message.case === "compacted" || message.case === "erased") {
            if (message.case === "erased") {
              // The user's overrides are gone and their versions start again at 1: forget the ones seen.
              this.versions.clear();
            }
            resnapshot = true;
            break;
          } else {
            this.apply(message);
          }
        }
        this.unhealthy();
      } catch (error) {
        if (this.closed) {
          return;
        }
        failed = true;
        this.unhealthy();
        if (!(error instanceof PrefdError)) {
          this.logger.error(`prefd view of ${this.subject.userId}: unexpected error; retrying`, error);
        }
        const typed = PrefdError.from(error);
        this.lastError = typed;
        if (!this.startSettled) {
          this.startSettled = true;
          this.rejectStarted(typed);
          return;
        }
        if (FATAL.has(typed.code)) {
          this.logger.warn(`prefd view of ${this.subject.userId}: ${typed.message}; retrying`);
        }
      } finally {
        this.closing.signal.removeEventListener("abort", stop);
        stream.abort();
      }
      if (this.closed) {
        return;
      }
      if (failed || !resnapshot) {
        // A compacted cursor re-snapshots at once; anything else waits first.
        this.reconnects += 1;
        try {
          await sleep(this.delay(attempt), this.closing.signal);
        } catch {
          return; // closed while waiting
        }
        attempt += 1;
      }
    }
  }

  private delay(attempt: number): number {
    const { initialMs, maxMs, multiplier } = this.backoff;
    return Math.random() * Math.min(maxMs, initialMs * multiplier ** attempt);
  }

  private healthy(): void {
    this.unhealthySince = undefined;
    if (!this.startSettled) {
      this.startSettled = true;
      this.resolveStarted();
    }
  }

  private unhealthy(): void {
    if (this.unhealthySince === undefined) {
      this.unhealthySince = performance.now();
    }
  }

  private checkFresh(): void {
    if (this.stale && this.unhealthySince !== undefined) {
      throw new StaleViewError((performance.now() - this.unhealthySince) / 1000);
    }
  }

  // --- feeding -----------------------------------------------------------------------------

  /** Replace the view's contents with a fresh read, its cursor included. */
  private async snapshot(): Promise<void> {
    const reply = await this.client.getEffectivePreferences(
      { subject: { userId: this.subject.userId, orgId: this.subject.orgId }, keyPrefixes: this.prefixes },
      { signal: this.closing.signal },
    );
    const values = new Map<string, PreferenceValue>();
    const sources = new Map<string, Provenance>();
    for (const effective of reply.values) {
      const value = typedValue(effective.value);
      if (value !== undefined) {
        values.set(effective.key, value);
      }
      if (effective.provenance !== undefined) {
        sources.set(effective.key, effective.provenance);
        const slot = slotOf(ChangeKind.PREFERENCE, effective.provenance.scope, effective.key);
        if (effective.provenance.version > (this.versions.get(slot) ?? 0n)) {
          this.versions.set(slot, effective.provenance.version);
        }
      }
    }
    const changes = diff(this.values, values);
    this.values = values;
    this.sources = sources;
    this.position = reply.cursor?.token ?? "";
    this.snapshots += 1;
    this.notify(changes);
  }

  /** Apply one watch message (not `started`, `compacted` or `erased`). */
  private apply(message: WatchMessage): void {
    if (message.case === "progress") {
      this.position = message.value.cursor?.token ?? this.position;
      return;
    }
    if (message.case !== "change") {
      return;
    }
    const event: ChangeEvent = message.value;
    const slot = slotOf(event.kind, event.scope, event.key);
    if (event.version !== 0n && event.version <= (this.versions.get(slot) ?? 0n)) {
      this.position = event.cursor?.token ?? this.position; // already reflected (a resumed stream's overlap)
      return;
    }
    this.versions.set(slot, event.version);
    this.changesApplied += 1;
    const key = event.key;
    const old = this.values.get(key);
    const fresh = event.effective !== undefined ? typedValue(event.effective.value) : undefined;
    if (fresh !== undefined && event.effective !== undefined) {
      this.values.set(key, fresh);
      if (event.effective.provenance !== undefined) {
        this.sources.set(key, event.effective.provenance);
      } else {
        this.sources.delete(key);
      }
    } else {
      this.values.delete(key);
      this.sources.delete(key);
    }
    this.position = event.cursor?.token ?? this.position;
    if (!sameValue(old, fresh)) {
      this.notify([{ key, old, new: fresh }]);
    }
  }

  private notify(changes: KeyChange[]): void {
    if (changes.length === 0) {
      return;
    }
    for (const listener of [...this.listeners]) {
      try {
        listener(changes);
      } catch (error) {
        // One failing listener neither stops the others nor the view.
        this.logger.error("prefd view: an onChange listener threw", error);
      }
    }
  }
}

function slotOf(kind: ChangeKind, scope: Scope | undefined, key: string): string {
  return `${kind}\u0000${scope?.kind ?? 0}:${scope?.id ?? ""}\u0000${key}`;
}

function diff(old: ReadonlyMap<string, PreferenceValue>, fresh: ReadonlyMap<string, PreferenceValue>): KeyChange[] {
  const keys = [...new Set([...old.keys(), ...fresh.keys()])].sort();
  return keys
    .filter((key) => !sameValue(old.get(key), fresh.get(key)))
    .map((key) => ({ key, old: old.get(key), new: fresh.get(key) }));
}

function nonNegative(name: string, value: number): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative number (got ${String(value)})`);
  }
  return value;
}
