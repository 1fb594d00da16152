/**
 * The live view against a real prefd server: changes arrive with old and new values, the view
 * equals GetEffectivePreferences under concurrent writes, local reads, staleness after the grace
 * period, and typed errors at once for a bad token, a forbidden subject or an unreachable server.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  Code,
  createPrefdClient,
  Layer,
  PrefdError,
  ScopeKind,
  StaleViewError,
  typedValue,
  type PreferenceValue,
  type PrefdClient,
} from "../src/index.js";
import { ChangeRecorder, closeSuite, freePort, FreshDatabase, openSuite, orgScope, PrefdServer, setRequest, token, unique, until, userScope } from "./support/prefd.js";

const FAST = { initialMs: 20, maxMs: 200 };

describe("preferences view", () => {
  let database: FreshDatabase;
  let server: PrefdServer;
  let admin: PrefdClient;

  before(async () => {
    ({ database, server, admin } = await openSuite());
  });

  after(async () => {
    await closeSuite({ database, server, admin });
  });

  async function truth(userId: string, orgId = ""): Promise<Record<string, PreferenceValue | undefined>> {
    const reply = await admin.preferences.getEffectivePreferences({ subject: { userId, orgId } });
    return Object.fromEntries(reply.values.map((value) => [value.key, typedValue(value.value)]));
  }

  test("a view receives each change with its old and new value, and reads locally", async () => {
    const uid = unique("u");
    const oid = unique("o");
    const view = await admin.preferencesView(uid, oid);
    const recorder = new ChangeRecorder(view);
    assert.deepEqual(view.asFlatObject(), await truth(uid, oid));
    assert.equal(view.snapshots, 1);
    assert.ok(view.cursor);
    assert.equal(view.get("display.items_per_page"), 25);
    assert.equal(view.provenance("display.items_per_page")?.layer, Layer.DEFAULT);

    await admin.preferences.setPreferences(setRequest(orgScope(oid), { "display.items_per_page": 50 }));
    await recorder.waitFor(() => recorder.changes.length === 1, 10_000, "the org write");
    assert.deepEqual(recorder.changes, [{ key: "display.items_per_page", old: 25, new: 50 }]);
    assert.equal(view.provenance("display.items_per_page")?.layer, Layer.ORG);
    assert.equal(view.provenance("display.items_per_page")?.scope?.id, oid);

    await admin.preferences.setPreferences(
      setRequest(userScope(uid), { "display.items_per_page": 10, "display.theme": "dark" }),
    );
    await recorder.waitFor(() => recorder.changes.length === 3, 10_000, "the user write");
    assert.deepEqual(recorder.changes.slice(1).sort((a, b) => a.key.localeCompare(b.key)), [
      { key: "display.items_per_page", old: 50, new: 10 },
      { key: "display.theme", old: "light", new: "dark" },
    ]);

    // An org write under a user override changes no effective value: no callback.
    await admin.preferences.setPreferences(setRequest(orgScope(oid), { "display.items_per_page": 60 }));
    await admin.preferences.deletePreferences({ scope: userScope(uid), keys: ["display.items_per_page"] });
    await recorder.waitFor(() => recorder.changes.length === 4, 10_000, "the delete");
    assert.deepEqual(recorder.changes[3], { key: "display.items_per_page", old: 10, new: 60 });

    assert.equal(view.getInt("display.items_per_page"), 60);
    assert.equal(view.getString("display.theme"), "dark");
    assert.equal(view.getBool("behavior.auto_save"), true);
    assert.equal(view.get("no.such.key", "fallback"), "fallback");
    assert.equal(view.getNumber("no.such.key", 1.5), 1.5);
    assert.deepEqual(view.getList("no.such.key"), []);
    const nested = view.asObject() as { display: { theme: string; items_per_page: number } };
    assert.equal(nested.display.theme, "dark");
    assert.equal(nested.display.items_per_page, 60);
    assert.deepEqual(view.asFlatObject(), await truth(uid, oid));
    assert.equal(view.changesApplied, 5); // the shadowed org write is applied too, without a callback
    assert.equal(view.stale, false);
  });

  test("a view equals GetEffectivePreferences after concurrent writes at two scopes", async () => {
    const uid = unique("u");
    const oid = unique("o");
    const view = await admin.preferencesView(uid, oid);
    const recorder = new ChangeRecorder(view);
    const userVersions: bigint[] = [];
    view.onChange((changes) => {
      for (const change of changes) {
        const source = view.provenance(change.key);
        if (change.key === "display.items_per_page" && source?.scope?.kind === ScopeKind.USER) {
          userVersions.push(source.version);
        }
      }
    });

    async function writer(scope: { kind: ScopeKind; id: string }, key: string, values: PreferenceValue[]): Promise<void> {
      for (const [n, value] of values.entries()) {
        if (n % 5 === 4) {
          await admin.preferences.deletePreferences({ scope, keys: [key] });
        } else {
          await admin.preferences.setPreferences(setRequest(scope, { [key]: value }));
        }
      }
    }

    const themes = Array.from({ length: 15 }, (_, n) => ["dark", "light", "system"][n % 3] as string);
    await Promise.all([
      writer(userScope(uid), "display.items_per_page", themes.map((_, n) => 10 + n)),
      writer(orgScope(oid), "display.items_per_page", themes.map((_, n) => 100 + n)),
      writer(userScope(uid), "display.theme", themes),
      writer(orgScope(oid), "display.theme", [...themes].reverse()),
    ]);
    const expected = await truth(uid, oid);
    const converged = (): boolean => JSON.stringify(view.asFlatObject()) === JSON.stringify(expected);
    await recorder.waitFor(converged, 10_000, "the view to equal the server");
    assert.equal(view.snapshots, 1);
    assert.equal(view.stale, false);
    assert.ok(recorder.changes.length > 0);
    // The view never went back to an older version of the user's override.
    assert.deepEqual(userVersions, [...userVersions].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
    assert.equal(new Set(userVersions).size, userVersions.length);
  });

  test("a listener that throws neither stops the others nor the view", async () => {
    const uid = unique("u");
    const logged: unknown[] = [];
    const view = await admin.preferencesView(uid, "", {
      logger: { warn: (message) => logged.push(message), error: (message) => logged.push(message) },
    });
    view.onChange(() => {
      throw new Error("listener bug");
    });
    const recorder = new ChangeRecorder(view);
    const unsubscribe = view.onChange(() => assert.fail("an unsubscribed listener was called"));
    unsubscribe();
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "dark" }));
    await recorder.waitFor(() => recorder.changes.length === 1, 10_000);
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "system" }));
    await recorder.waitFor(() => recorder.changes.length === 2, 10_000);
    assert.deepEqual(recorder.valuesOf("display.theme"), ["dark", "system"]);
    assert.equal(logged.length, 2);
  });

  test("a view of key prefixes holds only those keys", async () => {
    const uid = unique("u");
    const view = await admin.preferencesView(uid, "", { keyPrefixes: ["display."] });
    const recorder = new ChangeRecorder(view);
    assert.ok(view.keys().length > 0);
    assert.ok(view.keys().every((key) => key.startsWith("display.")));
    await admin.preferences.setPreferences(
      setRequest(userScope(uid), { "behavior.auto_save": false, "display.theme": "dark" }),
    );
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "system" }));
    // Feed order: had the first write's other key come through, it would be here before "system".
    await recorder.waitFor(() => view.get("display.theme") === "system", 10_000);
    assert.deepEqual(recorder.changes, [
      { key: "display.theme", old: "light", new: "dark" },
      { key: "display.theme", old: "dark", new: "system" },
    ]);
    assert.equal(view.get("behavior.auto_save"), undefined);
  });

  test("an erased user's view re-snapshots, and follows the versions that start again after it", async () => {
    const uid = unique("u");
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "dark" }));
    const view = await admin.preferencesView(uid);
    const recorder = new ChangeRecorder(view);
    assert.equal(view.provenance("display.theme")?.version, 1n);

    await admin.audit.eraseUserData({ userId: uid, reason: "the user asked" });
    await recorder.waitFor(() => view.get("display.theme") === "light", 10_000, "the erasure");
    assert.equal(view.provenance("display.theme")?.layer, Layer.DEFAULT);
    // The user's next override is version 1 again: the view applies it, not skips it as already seen.
    const written = await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "system" }));
    assert.equal(written.changes[0]?.newVersion, 1n);
    await recorder.waitFor(() => view.get("display.theme") === "system", 10_000, "the override after the erasure");
    assert.deepEqual(recorder.valuesOf("display.theme"), ["light", "system"]);
    assert.equal(view.snapshots, 2, "the erasure is answered by a re-snapshot");
    assert.deepEqual(view.asFlatObject(), await truth(uid));
  });

  test("start rejects at once with the typed error: bad token, forbidden subject, unreachable server", async () => {
    const started = performance.now();
    const cases: Array<[PrefdClient, Code]> = [
      [createPrefdClient({ target: server.target, token: "not-a-token" }), Code.Unauthenticated],
      [createPrefdClient({ target: server.target, token: token("user", "mallory") }), Code.PermissionDenied],
      [createPrefdClient({ target: `127.0.0.1:${await freePort()}`, token: token("admin"), deadlineMs: 3_000 }), Code.Unavailable],
    ];
    for (const [client, code] of cases) {
      try {
        await assert.rejects(client.preferencesView("alice"), (error: unknown) => {
          assert.ok(error instanceof PrefdError);
          assert.equal(error.code, code, error.message);
          return true;
        });
      } finally {
        await client.close();
      }
    }
    assert.ok(performance.now() - started < 5_000, "typed errors come at once, not after a hang");
  });

  test("a view is stale after its grace period without a stream, keeps its values, and can be told to throw", async () => {
    const own = await new PrefdServer(database.url, await freePort()).start();
    const client = createPrefdClient({ target: own.target, token: token("admin"), deadlineMs: 2_000 });
    try {
      const uid = unique("u");
      const lenient = await client.preferencesView(uid, "", { graceMs: 300, backoff: FAST });
      const strict = await client.preferencesView(uid, "", { graceMs: 300, backoff: FAST, raiseWhenStale: true });
      assert.equal(strict.get("display.theme"), "light");
      assert.equal(lenient.stale, false);
      await own.kill();
      await until(() => lenient.stale && strict.stale, 5_000, "both views to be stale");
      assert.equal(lenient.get("display.theme"), "light"); // the last known value is still served
      assert.ok(lenient.reconnects >= 1);
      assert.ok(lenient.lastError !== undefined);
      assert.throws(() => strict.get("display.theme"), (error: unknown) => {
        assert.ok(error instanceof StaleViewError);
        assert.equal(error.code, Code.Unavailable);
        assert.equal(error.reason, "VIEW_STALE");
        return true;
      });
      // Back on its port, the server heals both views.
      await own.start();
      await until(() => !lenient.stale && !strict.stale, 20_000, "both views to be healthy again");
      assert.equal(strict.get("display.theme"), "light");
    } finally {
      await client.close();
      await own.dispose();
    }
  });
});
