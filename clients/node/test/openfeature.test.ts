/**
 * PrefdProvider through the OpenFeature server SDK's public API against real prefd servers: reasons,
 * variants and metadata from provenance (a rollout included), the error codes, CONFIGURATION_CHANGED
 * with the changed keys, the bound on views, shutdown and initialize again, and the provider's
 * events and errors when the server refuses the token or the subject, cannot be reached, goes away
 * and comes back. Also: the package's root entry never loads the SDK.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { after, afterEach, before, describe, test } from "node:test";

import {
  ErrorCode,
  OpenFeature,
  ProviderEvents,
  ProviderStatus,
  type Client,
  type EvaluationContext,
  type EventDetails,
} from "@openfeature/server-sdk";

import {
  Code,
  PrefdError,
  ScopeKind,
  ValueType,
  toTypedValue,
  type PreferenceValue,
  type PrefdClient,
} from "../src/index.js";
import { PrefdProvider, type PrefdProviderOptions } from "../src/openfeature.js";
import { closeSuite, freePort, FreshDatabase, openSuite, orgScope, PrefdServer, ROOT, SECRET, setRequest, token, unique, userScope } from "./support/prefd.js";

const FAST = { initialMs: 20, maxMs: 300 };

/** Definitions of one test's own, one per flag type, under one prefix. */
const DEFINITIONS: Record<Flag, [ValueType, PreferenceValue]> = {
  enabled: [ValueType.BOOL, false],
  limit: [ValueType.INT, 10],
  ratio: [ValueType.DOUBLE, 0.5],
  theme: [ValueType.STRING, "plain"],
  checkout: [ValueType.STRING, "old"],
  layout: [ValueType.JSON, { columns: 2 }],
  channels: [ValueType.STRING_LIST, ["email"]],
};
type Flag = "enabled" | "limit" | "ratio" | "theme" | "checkout" | "layout" | "channels";
type Keys = Record<Flag | "missing" | "prefix", string>;

function subject(userId: string, orgId = ""): EvaluationContext {
  return orgId ? { targetingKey: userId, org: orgId } : { targetingKey: userId };
}

/** Event details an OpenFeature handler receives, awaited with a deadline. */
class Events {
  readonly seen: EventDetails[] = [];
  private taken = 0;
  private readonly waiters = new Set<() => void>();
  readonly handler = (details?: EventDetails): void => {
    this.seen.push(details ?? ({} as EventDetails));
    for (const wake of [...this.waiters]) {
      wake();
    }
  };

  /** The first event not yet taken (received before or from now on) for which `holds`. */
  until(holds: (details: EventDetails) => boolean, deadlineMs = 15_000, what = "an event"): Promise<EventDetails> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        for (; this.taken < this.seen.length; this.taken++) {
          const details = this.seen[this.taken] as EventDetails;
          if (holds(details)) {
            this.taken += 1;
            resolve(details);
            return true;
          }
        }
        return false;
      };
      if (check()) {
        return;
      }
      const wake = (): void => {
        if (check()) {
          clearTimeout(timer);
          this.waiters.delete(wake);
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(wake);
        reject(new Error(`timed out after ${deadlineMs} ms waiting for ${what}; saw ${JSON.stringify(this.seen)}`));
      }, deadlineMs);
      this.waiters.add(wake);
    });
  }
}

/** A CONFIGURATION_CHANGED event's changed keys. */
function flagsChanged(details: EventDetails): string[] {
  return (details.flagsChanged as string[] | undefined) ?? [];
}

type Answered = { value: unknown; reason?: string; errorCode?: ErrorCode; errorMessage?: string };
type Rejection = Error & { code?: string; cause?: unknown };

/** `details` is the default value with error `code` and a message. */
function fails(details: Answered, code: ErrorCode, value: unknown): void {
  assert.deepEqual([details.value, details.reason, details.errorCode], [value, "ERROR", code], JSON.stringify(details));
  assert.ok(details.errorMessage, "an error has a message");
}

describe("OpenFeature provider", () => {
  let database: FreshDatabase;
  let server: PrefdServer;
  let admin: PrefdClient;

  before(async () => {
    ({ database, server, admin } = await openSuite());
  });

  after(async () => {
    await closeSuite({ database, server, admin });
  });

  afterEach(async () => {
    // The SDK's state is global: every provider shut down, every handler and context gone.
    await OpenFeature.clearProviders();
    OpenFeature.clearHandlers();
    OpenFeature.clearHooks();
    OpenFeature.setContext({});
  });

  async function defineKeys(): Promise<Keys> {
    const prefix = `tests.${unique("of")}.`;
    for (const [name, [type, value]] of Object.entries(DEFINITIONS)) {
      await admin.preferences.createDefinition({
        definition: { key: `${prefix}${name}`, category: "tests", type, defaultValue: toTypedValue(value) },
      });
    }
    const keys = Object.fromEntries(Object.keys(DEFINITIONS).map((name) => [name, `${prefix}${name}`]));
    return { ...keys, missing: `${prefix}missing`, prefix } as Keys;
  }

  function providerFor(keys: Keys, options: Partial<PrefdProviderOptions> = {}): PrefdProvider {
    return new PrefdProvider({ target: server.target, token: token("admin"), keyPrefixes: [keys.prefix], ...options });
  }

  /** `provider` set for a domain of its own, and that domain's client. */
  async function registered(provider: PrefdProvider): Promise<Client> {
    const domain = unique("domain");
    await OpenFeature.setProviderAndWait(domain, provider);
    return OpenFeature.getClient(domain);
  }

  test("reasons, variants and metadata follow provenance", async () => {
    const keys = await defineKeys();
    const [uid, oid] = [unique("u"), unique("o")];
    await admin.preferences.setPreferences(setRequest({ kind: ScopeKind.GLOBAL, id: "" }, { [keys.theme]: "dark" }));
    await admin.preferences.setPreferences(setRequest(orgScope(oid), { [keys.limit]: 20 }));
    await admin.preferences.setPreferences(setRequest(userScope(uid), { [keys.ratio]: 0.75 }));
    const variants = [
      { name: "control", value: toTypedValue("old"), weight: 50 },
      { name: "treatment", value: toTypedValue("new"), weight: 50 },
    ];
    await admin.preferences.setPreferences({
      scope: orgScope(oid),
      writes: [{ key: keys.checkout, rollout: { variants, salt: "checkout-test" } }],
    });
    // The variant the server assigns this subject, read over the network.
    const truth = await admin.preferences.getEffectivePreferences({
      subject: { userId: uid, orgId: oid },
      keyPrefixes: [keys.checkout],
    });
    const expectedVariant = truth.values[0]?.provenance?.rollout?.variant;
    assert.ok(expectedVariant === "control" || expectedVariant === "treatment");

    const flags = await registered(providerFor(keys));
    assert.equal(flags.providerStatus, ProviderStatus.READY);
    const ctx = subject(uid, oid);
    // The first evaluation waits for the subject's view; every later one is answered from it.
    const enabled = await flags.getBooleanDetails(keys.enabled, true, ctx);
    assert.deepEqual(
      [enabled.value, enabled.reason, enabled.errorCode, enabled.variant],
      [false, "DEFAULT", undefined, undefined],
    );
    assert.equal(enabled.flagMetadata.layer, "DEFAULT");
    assert.equal(enabled.flagMetadata.scope, "");
    assert.equal(enabled.flagMetadata.version, 1);
    assert.ok(enabled.flagMetadata.cursor);

    const theme = await flags.getStringDetails(keys.theme, "x", ctx);
    assert.deepEqual([theme.value, theme.reason], ["dark", "STATIC"]);
    assert.deepEqual([theme.flagMetadata.layer, theme.flagMetadata.scope], ["GLOBAL", "GLOBAL"]);
    assert.deepEqual([theme.flagMetadata.updatedBy, theme.flagMetadata.version], ["ops", 1]);

    const limit = await flags.getNumberDetails(keys.limit, 0, ctx);
    assert.deepEqual([limit.value, limit.reason], [20, "TARGETING_MATCH"]);
    assert.deepEqual([limit.flagMetadata.layer, limit.flagMetadata.scope], ["ORG", `ORG:${oid}`]);

    const ratio = await flags.getNumberDetails(keys.ratio, 0, ctx);
    assert.deepEqual([ratio.value, ratio.reason], [0.75, "TARGETING_MATCH"]);
    assert.deepEqual([ratio.flagMetadata.layer, ratio.flagMetadata.scope], ["USER", `USER:${uid}`]);
    assert.ok(!Number.isNaN(Date.parse(String(ratio.flagMetadata.updatedAt))));

    const checkout = await flags.getStringDetails(keys.checkout, "x", ctx);
    assert.deepEqual([checkout.reason, checkout.variant], ["SPLIT", expectedVariant]);
    assert.equal(checkout.value, expectedVariant === "control" ? "old" : "new");
    assert.equal(checkout.flagMetadata.layer, "ORG");

    const layout = await flags.getObjectDetails(keys.layout, {}, ctx);
    assert.deepEqual([layout.value, layout.reason], [{ columns: 2 }, "DEFAULT"]);
    (layout.value as { columns: number }).columns = 99; // the caller's copy: the next answer is the view's
    assert.deepEqual(await flags.getObjectValue(keys.layout, {}, ctx), { columns: 2 });
    const channels = await flags.getObjectDetails(keys.channels, [], ctx);
    assert.deepEqual([channels.value, channels.reason], [["email"], "DEFAULT"]);
    // Another subject of the same org: the org's values, not the user's.
    const other = await flags.getNumberDetails(keys.ratio, 0, subject(unique("u"), oid));
    assert.deepEqual([other.value, other.reason], [0.5, "DEFAULT"]);
    assert.equal((await flags.getNumberDetails(keys.limit, 0, subject(unique("u"), oid))).value, 20);
  });

  test("unknown keys, wrong types and bad contexts answer the default with their error", async () => {
    const keys = await defineKeys();
    const flags = await registered(providerFor(keys));
    const ctx = subject(unique("u"));
    assert.equal((await flags.getBooleanDetails(keys.enabled, true, ctx)).errorCode, undefined);

    fails(await flags.getBooleanDetails(keys.missing, true, ctx), ErrorCode.FLAG_NOT_FOUND, true);
    // A key the provider's views do not hold (outside keyPrefixes) is not found either.
    fails(await flags.getStringDetails("display.theme", "x", ctx), ErrorCode.FLAG_NOT_FOUND, "x");
    fails(await flags.getBooleanDetails(keys.limit, true, ctx), ErrorCode.TYPE_MISMATCH, true);
    fails(await flags.getNumberDetails(keys.enabled, 7, ctx), ErrorCode.TYPE_MISMATCH, 7);
    fails(await flags.getStringDetails(keys.limit, "x", ctx), ErrorCode.TYPE_MISMATCH, "x");
    fails(await flags.getObjectDetails(keys.theme, {}, ctx), ErrorCode.TYPE_MISMATCH, {});
    fails(await flags.getNumberDetails(keys.layout, 3, ctx), ErrorCode.TYPE_MISMATCH, 3);
    const mismatch = await flags.getBooleanDetails(keys.theme, false, ctx);
    assert.equal(mismatch.errorMessage, `"${keys.theme}" is a string, not a boolean`);
    const list = await flags.getStringDetails(keys.channels, "", ctx);
    assert.equal(list.errorMessage, `"${keys.channels}" is a string list, not a string`);
    // Ints and doubles are both numbers.
    assert.deepEqual((await flags.getNumberDetails(keys.limit, 0, ctx)).value, 10);
    assert.deepEqual((await flags.getNumberDetails(keys.ratio, 0, ctx)).value, 0.5);

    fails(await flags.getBooleanDetails(keys.enabled, true), ErrorCode.TARGETING_KEY_MISSING, true);
    fails(await flags.getBooleanDetails(keys.enabled, true, { org: "acme" }), ErrorCode.TARGETING_KEY_MISSING, true);
    fails(await flags.getNumberDetails(keys.limit, 3, { targetingKey: "alice", org: 5 }), ErrorCode.INVALID_CONTEXT, 3);
    // An id the server refuses: the subject's own error, at once.
    fails(await flags.getBooleanDetails(keys.enabled, true, subject("bad\nid")), ErrorCode.INVALID_CONTEXT, true);
    assert.equal(flags.providerStatus, ProviderStatus.READY);
  });

  test("a write is announced with the changed keys and the subject", async () => {
    const keys = await defineKeys();
    const [uid, oid] = [unique("u"), unique("o")];
    const flags = await registered(providerFor(keys));
    const changed = new Events();
    flags.addHandler(ProviderEvents.ConfigurationChanged, changed.handler);
    const ctx = subject(uid, oid);
    assert.equal(await flags.getBooleanValue(keys.enabled, true, ctx), false);
    await admin.preferences.setPreferences(setRequest(userScope(uid), { [keys.enabled]: true, [keys.limit]: 30 }));
    const announced = new Set<string>();
    await changed.until((details) => {
      for (const key of flagsChanged(details)) {
        announced.add(key);
      }
      return announced.has(keys.enabled) && announced.has(keys.limit);
    });
    // The view's first snapshot is no change: every event named the written keys only.
    for (const details of changed.seen) {
      const written = flagsChanged(details).every((key) => key === keys.enabled || key === keys.limit);
      assert.ok(written, JSON.stringify(details));
      assert.deepEqual(details.metadata, { targetingKey: uid, org: oid });
    }
    const enabled = await flags.getBooleanDetails(keys.enabled, false, ctx);
    assert.deepEqual([enabled.value, enabled.reason, enabled.flagMetadata.layer], [true, "TARGETING_MATCH", "USER"]);
    assert.equal(await flags.getNumberValue(keys.limit, 0, ctx), 30);

    // An org write reaches the subject too.
    await admin.preferences.setPreferences(setRequest(orgScope(oid), { [keys.theme]: "contrast" }));
    const orgChange = await changed.until((details) => flagsChanged(details)[0] === keys.theme);
    assert.deepEqual(orgChange.flagsChanged, [keys.theme]);
    assert.deepEqual(orgChange.metadata, { targetingKey: uid, org: oid });
    assert.equal(await flags.getStringValue(keys.theme, "x", ctx), "contrast");
  });

  test("views are bounded and the least recently evaluated closes first", async () => {
    const keys = await defineKeys();
    const [a, b, c] = [unique("a"), unique("b"), unique("c")];
    const provider = providerFor(keys, { maxViews: 2 });
    const flags = await registered(provider);
    const changed = new Events();
    flags.addHandler(ProviderEvents.ConfigurationChanged, changed.handler);
    for (const uid of [a, b, a]) {
      assert.equal(await flags.getNumberValue(keys.limit, 0, subject(uid)), 10);
    }
    assert.deepEqual(provider.subjects, [[b, ""], [a, ""]]);
    assert.equal(await flags.getNumberValue(keys.limit, 0, subject(c)), 10);
    assert.deepEqual(provider.subjects, [[a, ""], [c, ""]]); // b was the least recently evaluated
    assert.equal(await flags.getNumberValue(keys.limit, 0, subject(a)), 10);
    assert.deepEqual(provider.subjects, [[c, ""], [a, ""]]);

    // b's view is closed: a write to b is announced for no one, one to a (written after it) is.
    await admin.preferences.setPreferences(setRequest(userScope(b), { [keys.limit]: 11 }));
    await admin.preferences.setPreferences(setRequest(userScope(a), { [keys.limit]: 12 }));
    await changed.until((details) => details.metadata?.targetingKey === a, 10_000, "a's change");
    assert.deepEqual(changed.seen.map((details) => details.metadata?.targetingKey), [a]);
    // b's next evaluation opens a new view with what was written meanwhile (and c, now the least recent, closes).
    const reopened = await flags.getNumberDetails(keys.limit, 0, subject(b));
    assert.deepEqual([reopened.value, reopened.reason], [11, "TARGETING_MATCH"]);
    assert.deepEqual(provider.subjects, [[a, ""], [b, ""]]);

    await OpenFeature.clearProviders();
    assert.deepEqual(provider.subjects, []); // shut down: every view closed
  });

  test("shutdown closes the views, and initialize starts again and opens the global context's subject", async () => {
    const keys = await defineKeys();
    const provider = providerFor(keys);
    const uid = unique("u");
    let flags = await registered(provider);
    assert.equal(await flags.getNumberValue(keys.limit, 0, subject(uid)), 10);
    assert.deepEqual(provider.subjects, [[uid, ""]]);
    await OpenFeature.clearProviders();
    assert.deepEqual(provider.subjects, []);

    OpenFeature.setContext(subject(uid));
    flags = await registered(provider);
    assert.deepEqual(provider.subjects, [[uid, ""]]); // opened by initialize
    const details = await flags.getNumberDetails(keys.limit, 0);
    assert.deepEqual([details.value, details.reason], [10, "DEFAULT"]);
  });

  test("a refused token is fatal at once", async () => {
    const keys = await defineKeys();
    const started = performance.now();
    const errors = new Events();
    OpenFeature.addHandler(ProviderEvents.Error, errors.handler);
    const provider = new PrefdProvider({ target: server.target, token: "not-a-token", keyPrefixes: [keys.prefix] });
    const domain = unique("domain");
    await assert.rejects(OpenFeature.setProviderAndWait(domain, provider), (error: Rejection) => {
      assert.equal(error.code, ErrorCode.PROVIDER_FATAL);
      assert.ok(error.cause instanceof PrefdError);
      assert.equal(error.cause.code, Code.Unauthenticated);
      assert.match(error.message, /UNAUTHENTICATED/);
      return true;
    });
    const event = await errors.until(() => true);
    assert.match(String(event.message), /UNAUTHENTICATED/);
    const flags = OpenFeature.getClient(domain);
    assert.equal(flags.providerStatus, ProviderStatus.FATAL);
    fails(await flags.getBooleanDetails(keys.enabled, true, subject(unique("u"))), ErrorCode.PROVIDER_FATAL, true);
    assert.ok(performance.now() - started < 10_000);
  });

  test("an unreachable server is an error at once and each evaluation says why", async () => {
    const keys = await defineKeys();
    const started = performance.now();
    const provider = new PrefdProvider({
      target: `127.0.0.1:${await freePort()}`,
      token: token("admin"),
      keyPrefixes: [keys.prefix],
      timeoutMs: 2_000,
    });
    const domain = unique("domain");
    await assert.rejects(OpenFeature.setProviderAndWait(domain, provider), (error: Rejection) => {
      assert.equal(error.code, ErrorCode.GENERAL);
      assert.ok(error.cause instanceof PrefdError);
      assert.equal(error.cause.code, Code.Unavailable, error.message); // refused at once, not left to the deadline
      return true;
    });
    const flags = OpenFeature.getClient(domain);
    assert.equal(flags.providerStatus, ProviderStatus.ERROR);
    const failed = await flags.getBooleanDetails(keys.enabled, true, subject(unique("u")));
    fails(failed, ErrorCode.GENERAL, true);
    assert.match(String(failed.errorMessage), /UNAVAILABLE/);
    assert.ok(performance.now() - started < 15_000);
  });

  test("a subject the token may not read answers its own error; the provider stays ready", async () => {
    const keys = await defineKeys();
    const mallory = token("user", "mallory");
    const provider = new PrefdProvider({ target: server.target, token: mallory, keyPrefixes: [keys.prefix] });
    const flags = await registered(provider);
    const forbidden = await flags.getBooleanDetails(keys.enabled, true, subject("alice"));
    fails(forbidden, ErrorCode.GENERAL, true);
    assert.match(String(forbidden.errorMessage), /PERMISSION_DENIED/);
    // The same error from memory until the retry interval has passed (no call per evaluation).
    const again = await flags.getBooleanDetails(keys.enabled, true, subject("alice"));
    assert.deepEqual([again.errorCode, again.errorMessage], [ErrorCode.GENERAL, forbidden.errorMessage]);
    // Its own subject is served.
    const own = await flags.getBooleanDetails(keys.enabled, true, subject("mallory"));
    assert.deepEqual([own.value, own.reason, own.errorCode], [false, "DEFAULT", undefined]);
    assert.equal(flags.providerStatus, ProviderStatus.READY);
    await assert.rejects(provider.warm("alice"), (error: Rejection) => {
      assert.equal(error.code, ErrorCode.GENERAL);
      assert.equal((error.cause as PrefdError).code, Code.PermissionDenied);
      return true;
    });
  });

  test("a server that goes away makes views stale, then refused, then ready again", async () => {
    const keys = await defineKeys();
    const port = await freePort();
    let outage = await new PrefdServer(database.url, port).start();
    const logged: string[] = [];
    const provider = new PrefdProvider({
      target: `127.0.0.1:${port}`,
      token: token("admin"),
      keyPrefixes: [keys.prefix],
      timeoutMs: 3_000,
      graceMs: 300,
      backoff: FAST,
      healthCheckMs: 50,
      logger: { warn: (message) => logged.push(message), error: (message) => logged.push(message) },
    });
    const ctx = subject(unique("u"));
    const [stale, errors, ready] = [new Events(), new Events(), new Events()];
    try {
      const flags = await registered(provider);
      flags.addHandler(ProviderEvents.Stale, stale.handler);
      flags.addHandler(ProviderEvents.Error, errors.handler);
      flags.addHandler(ProviderEvents.Ready, ready.handler);
      await ready.until(() => true); // the current status, at once
      assert.equal(await flags.getNumberValue(keys.limit, 0, ctx), 10);

      await outage.dispose(); // the server goes away: the view serves its last values, then is stale
      const wentStale = await stale.until(() => true);
      assert.deepEqual(wentStale.metadata, { staleViews: 1 });
      assert.equal(flags.providerStatus, ProviderStatus.STALE);
      const served = await flags.getNumberDetails(keys.limit, 0, ctx);
      assert.deepEqual([served.value, served.reason, served.errorCode], [10, "STALE", undefined]);
      assert.equal(served.flagMetadata.layer, "DEFAULT");

      // Back with another signing secret: the view's token is refused.
      outage = await new PrefdServer(database.url, port, { PREFD_JWT_SECRET: `${SECRET}-rotated` }).start();
      const refused = await errors.until((details) => /UNAUTHENTICATED/.test(String(details.message)));
      assert.equal(refused.errorCode, ErrorCode.GENERAL);
      assert.equal(flags.providerStatus, ProviderStatus.ERROR);
      assert.equal(await flags.getNumberValue(keys.limit, 0, ctx), 10);
      assert.ok(logged.some((message) => /UNAUTHENTICATED/.test(message)), JSON.stringify(logged));

      // Back as it was: the view resumes and the provider is READY again.
      await outage.dispose();
      outage = await new PrefdServer(database.url, port).start();
      await ready.until(() => true);
      assert.equal(flags.providerStatus, ProviderStatus.READY);
      const live = await flags.getNumberDetails(keys.limit, 0, ctx);
      assert.deepEqual([live.value, live.reason], [10, "DEFAULT"]);
    } finally {
      await OpenFeature.clearProviders();
      await outage.dispose();
    }
  });

  test("bad options are refused by name", () => {
    const cases: Array<[Partial<PrefdProviderOptions>, RegExp]> = [
      [{ maxViews: 0 }, /maxViews must be a whole number of at least 1/],
      [{ maxViews: 2.5 }, /maxViews must be a whole number of at least 1/],
      [{ timeoutMs: 0 }, /timeoutMs must be a number of milliseconds above 0/],
      [{ graceMs: -1 }, /graceMs must be a number of milliseconds above 0/],
      [{ healthCheckMs: "1" as unknown as number }, /healthCheckMs must be a number of milliseconds above 0/],
      [{ keyPrefixes: "display." as unknown as string[] }, /keyPrefixes is an array of prefixes/],
      [{ target: "" }, /target/],
    ];
    for (const [options, message] of cases) {
      assert.throws(() => new PrefdProvider({ target: "127.0.0.1:1", token: "t", ...options }), message);
    }
  });
});

describe("package entries", () => {
  /** Node with a resolve hook that refuses @openfeature/*, importing `specifier` from the package. */
  function importWithoutSdk(specifier: string): Promise<{ code: number | null; output: string }> {
    const hook = `export async function resolve(specifier, context, next) {
      if (specifier.startsWith("@openfeature/")) throw new Error("the SDK was loaded: " + specifier);
      return next(specifier, context);
    }`;
    const script = `import { register } from "node:module";
      register("data:text/javascript," + encodeURIComponent(${JSON.stringify(hook)}));
      const entry = await import(${JSON.stringify(specifier)});
      console.log(Object.keys(entry).length);`;
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
        cwd: join(ROOT, "clients", "node"),
        stdio: ["ignore", "pipe", "pipe"],
      });
      let output = "";
      child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
      child.on("error", reject);
      child.on("close", (code) => resolve({ code, output }));
    });
  }

  test("the root entry never loads the OpenFeature SDK; prefd-client/openfeature does", async () => {
    const root = await importWithoutSdk("prefd-client");
    assert.equal(root.code, 0, root.output);
    assert.ok(Number(root.output.trim()) > 10, root.output);
    const openfeature = await importWithoutSdk("prefd-client/openfeature");
    assert.notEqual(openfeature.code, 0);
    assert.match(openfeature.output, /the SDK was loaded: @openfeature\/server-sdk/);
    const subpath = "prefd-client/openfeature"; // a variable: resolved at run time, from dist
    const { PrefdProvider: exported } = (await import(subpath)) as { PrefdProvider: unknown };
    assert.equal(typeof exported, "function");
  });
});
