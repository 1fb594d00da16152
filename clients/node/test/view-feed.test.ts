/**
 * The view's feed handling against a scripted PreferencesService (Connect's Node adapter speaking
 * gRPC): what a real prefd server does not do on demand. A watch the server ends with CANCELLED is
 * resumed from the view's cursor; a change older than the version the view holds is never applied;
 * resumes back off exponentially with full jitter, from the first cap again after a healthy stream.
 */

import assert from "node:assert/strict";
import { createServer, type Http2Server } from "node:http2";
import { describe, test } from "node:test";

import type { MessageInitShape } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

import {
  ChangeKind,
  Code,
  createPrefdClient,
  Layer,
  PreferencesService,
  ScopeKind,
  toTypedValue,
  type PreferenceValue,
  type PrefdClient,
  type PreferencesView,
  type WatchPreferencesResponseSchema,
} from "../src/index.js";
import { ChangeRecorder, until, userScope } from "./support/prefd.js";

type WatchMessage = MessageInitShape<typeof WatchPreferencesResponseSchema>;
/** In a script's messages: wait until the test has its listener on the view (`ScriptedPrefd.release`). */
const HOLD = Symbol("hold");
type Step = WatchMessage | typeof HOLD;
/** One watch call's script: the messages it sends, then it ends (or throws, for an error status). */
type Script = (signal: AbortSignal, released: Promise<void>) => AsyncIterable<WatchMessage>;

const UID = "alice";
const THEME = "display.theme";
const SIZE = "display.items_per_page";

/** One watch call as the server saw it. */
interface Watch {
  readonly cursor: string;
  readonly startedAt: number;
  endedAt: number | undefined;
}

/** A PreferencesService whose snapshot and watch calls follow the test's script. */
class ScriptedPrefd {
  readonly watches: Watch[] = [];
  private readonly server: Http2Server;
  private readonly waiters = new Set<() => void>();
  /** Resolves once `release()` is called: held scripts go on. */
  private readonly released: Promise<void>;
  /** Let held scripts go on. */
  readonly release: () => void;
  port = 0;

  constructor(
    snapshot: Record<string, [PreferenceValue, bigint]>,
    private readonly scripts: Script[],
  ) {
    const values = Object.entries(snapshot).map(([key, [value, version]]) => ({
      key,
      value: toTypedValue(value),
      provenance: { layer: Layer.USER, scope: userScope(UID), version },
    }));
    const handler = connectNodeAdapter({
      routes: (router) =>
        router.service(PreferencesService, {
          getEffectivePreferences: () => ({ values, cursor: { token: "snapshot" } }),
          watchPreferences: (request, context) => this.watch(request.startCursor?.token ?? "", context.signal),
        }),
    });
    this.server = createServer(handler);
    let release!: () => void;
    this.released = new Promise((resolve) => (release = resolve));
    this.release = release;
  }

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    const address = this.server.address();
    this.port = typeof address === "object" && address !== null ? address.port : 0;
    return this;
  }

  async close(): Promise<void> {
    await new Promise((resolve) => this.server.close(resolve));
  }

  /** Resolves once `count` watch calls have started. */
  watchesStarted(count: number, deadlineMs = 10_000): Promise<void> {
    if (this.watches.length >= count) {
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const wake = (): void => {
        if (this.watches.length >= count) {
          clearTimeout(timer);
          this.waiters.delete(wake);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(wake);
        reject(new Error(`timed out after ${deadlineMs} ms waiting for ${count} watches; saw ${this.watches.length}`));
      }, deadlineMs);
      this.waiters.add(wake);
    });
  }

  private async *watch(cursor: string, signal: AbortSignal): AsyncIterable<WatchMessage> {
    const record: Watch = { cursor, startedAt: performance.now(), endedAt: undefined };
    const script = this.scripts[this.watches.length] ?? live();
    this.watches.push(record);
    for (const wake of [...this.waiters]) {
      wake();
    }
    try {
      yield* script(signal, this.released);
    } finally {
      record.endedAt = performance.now();
    }
  }
}

function started(): WatchMessage {
  return { message: { case: "started", value: {} } };
}

/** A change of the user's override of `key` to `value` at `version`, at feed position `cursor`. */
function change(key: string, value: PreferenceValue, version: bigint, cursor: string): WatchMessage {
  const scope = userScope(UID);
  return {
    message: {
      case: "change",
      value: {
        kind: ChangeKind.PREFERENCE,
        scope,
        key,
        version,
        newValue: toTypedValue(value),
        cursor: { token: cursor },
        effective: { key, value: toTypedValue(value), provenance: { layer: Layer.USER, scope, version } },
      },
    },
  };
}

/** `steps`' messages, waiting at each HOLD until `released`. */
async function* send(steps: Step[], released: Promise<void>): AsyncIterable<WatchMessage> {
  for (const step of steps) {
    if (step === HOLD) {
      await released;
    } else {
      yield step;
    }
  }
}

/** Sends `steps`, then ends the call with status `code`. */
function endsWith(code: Code, ...steps: Step[]): Script {
  return async function* (_signal, released) {
    yield* send(steps, released);
    throw new ConnectError(`the server ended the watch with ${Code[code]}`, code);
  };
}

/** Sends `steps`, then stays open until the client goes away. */
function live(...steps: Step[]): Script {
  return async function* (signal, released) {
    yield* send(steps, released);
    await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
  };
}

/** A client and a view of UID on `server`; both closed by `use`'s end. */
async function withView(
  server: ScriptedPrefd,
  options: Parameters<PrefdClient["preferencesView"]>[2],
  use: (view: PreferencesView, recorder: ChangeRecorder) => Promise<void>,
): Promise<void> {
  await server.start();
  const client = createPrefdClient({ target: server.target, token: "t", deadlineMs: 2_000 });
  try {
    const view = await client.preferencesView(UID, "", options);
    const recorder = new ChangeRecorder(view);
    server.release();
    await use(view, recorder);
  } finally {
    await client.close();
    await server.close();
  }
}

/** Math.random answering `value` while `use` runs. */
async function withRandom(value: number, use: () => Promise<void>): Promise<void> {
  const random = Math.random;
  Math.random = () => value;
  try {
    await use();
  } finally {
    Math.random = random;
  }
}

describe("a view's feed", () => {
  test("a watch the server ends with CANCELLED is resumed from the view's cursor", async () => {
    const server = new ScriptedPrefd({ [THEME]: ["light", 1n] }, [
      endsWith(Code.Canceled, started(), HOLD, change(THEME, "dark", 2n, "c1")),
      endsWith(Code.Canceled), // refused with CANCELLED before it started, as a busy server does
      live(started(), change(THEME, "system", 3n, "c2")),
    ]);
    await withView(server, { backoff: { initialMs: 10, maxMs: 50 } }, async (view, recorder) => {
      await recorder.waitFor(() => view.get(THEME) === "system", 10_000, "the change after the resume");
      assert.deepEqual(recorder.valuesOf(THEME), ["dark", "system"]);
      assert.deepEqual(
        server.watches.map((watch) => watch.cursor),
        ["snapshot", "c1", "c1"],
      );
      assert.equal(view.reconnects, 2);
      assert.equal(view.lastError?.code, Code.Canceled, view.lastError?.message);
      assert.equal(view.snapshots, 1);
      assert.equal(view.cursor, "c2");
      assert.equal(view.stale, false);
    });
  });

  test("a change older than the version the view holds is never applied", async () => {
    const server = new ScriptedPrefd({ [THEME]: ["dark", 5n], [SIZE]: [10, 1n] }, [
      live(
        started(),
        HOLD,
        change(THEME, "light", 4n, "c1"), // older than the snapshot's version 5
        change(SIZE, 20, 2n, "c2"),
        change(THEME, "system", 6n, "c3"),
        change(THEME, "contrast", 6n, "c4"), // the same version again
        change(SIZE, 15, 1n, "c5"),
        change(SIZE, 30, 3n, "c6"),
        change(THEME, "light", 5n, "c7"), // older again, and the last message
      ),
    ]);
    await withView(server, {}, async (view, recorder) => {
      await recorder.waitFor(() => view.get(SIZE) === 30, 10_000, "the last change");
      // Feed order, each key only forwards.
      assert.deepEqual(recorder.changes, [
        { key: SIZE, old: 10, new: 20 },
        { key: THEME, old: "dark", new: "system" },
        { key: SIZE, old: 20, new: 30 },
      ]);
      assert.equal(view.changesApplied, 3);
      assert.equal(view.provenance(THEME)?.version, 6n);
      // A skipped change still moves the cursor (it is the last message: nothing else to wait on).
      await until(() => view.cursor === "c7", 5_000, "the cursor of the skipped change");
      assert.equal(view.get(THEME), "system");
    });
  });

  test("resumes back off exponentially with full jitter, from the first cap after a healthy stream", async () => {
    // Math.random near 1: each wait is close to its cap (40, 80, 160, then 300 at most), and back to
    // the first cap after a stream that started.
    const unavailable = endsWith(Code.Unavailable);
    const server = new ScriptedPrefd({ [THEME]: ["light", 1n] }, [
      endsWith(Code.Unavailable, started()),
      unavailable,
      unavailable,
      unavailable,
      unavailable,
      endsWith(Code.Unavailable, started()),
      live(started()),
    ]);
    const backoff = { initialMs: 40, maxMs: 300, multiplier: 2 };
    await withRandom(0.999, () =>
      withView(server, { backoff }, async (view) => {
        await server.watchesStarted(7);
        const waits = server.watches.slice(1).map((watch, n) => watch.startedAt - (server.watches[n]?.endedAt ?? Infinity));
        const caps = [40, 80, 160, 300, 300, 40];
        for (const [n, cap] of caps.entries()) {
          assert.ok((waits[n] ?? 0) >= 0.999 * cap - 1, `wait ${n}: ${waits[n]} ms, cap ${cap} ms`);
        }
        assert.ok((waits[4] ?? Infinity) < 600, `the cap stops growing at maxMs: ${waits[4]} ms`);
        assert.ok((waits[5] ?? Infinity) < 300, `a healthy stream resets the backoff: ${waits[5]} ms`);
        assert.ok(server.watches.every((watch) => watch.cursor === "snapshot"));
        assert.equal(view.reconnects, 6);
      }),
    );

    // Math.random at 0: every wait is (close to) nothing, far below half of its cap.
    const jittered = new ScriptedPrefd({ [THEME]: ["light", 1n] }, [
      endsWith(Code.Unavailable, started()),
      endsWith(Code.Unavailable),
      endsWith(Code.Unavailable),
      live(started()),
    ]);
    await withRandom(0, () =>
      withView(jittered, { backoff: { initialMs: 600, maxMs: 600 } }, async () => {
        await jittered.watchesStarted(4);
        const waits = jittered.watches.slice(1).map((watch, n) => watch.startedAt - (jittered.watches[n]?.endedAt ?? Infinity));
        assert.ok(waits.every((wait) => wait < 300), `waits ${JSON.stringify(waits)} ms`);
      }),
    );
  });
});
