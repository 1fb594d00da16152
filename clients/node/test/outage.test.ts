/**
 * A view whose server is killed mid-stream and restarted on the same port while another server
 * on the same database takes writes: the view resumes from its cursor and loses nothing; when the
 * history behind its cursor was compacted during the outage, it re-snapshots and converges.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { createPrefdClient, typedValue, type PreferencesView, type PrefdClient } from "../src/index.js";
import { ChangeRecorder, FreshDatabase, freePort, PrefdServer, setRequest, token, unique, until, userScope } from "./support/prefd.js";

const FAST = { initialMs: 50, maxMs: 300 };
const KEY = "display.items_per_page";

interface Outage {
  view: PreferencesView;
  recorder: ChangeRecorder;
  expected: Record<string, unknown>;
}

describe("a view across a server outage", () => {
  let database: FreshDatabase;
  let writerServer: PrefdServer;
  let writer: PrefdClient;

  before(async () => {
    database = await FreshDatabase.create();
    writerServer = await new PrefdServer(database.url).start();
    writer = createPrefdClient({ target: writerServer.target, token: token("admin") });
  });

  after(async () => {
    await writer?.close();
    await writerServer?.dispose();
    await database?.drop();
  });

  /**
   * A view on a server that is killed after the view saw 11, then, after writes 12..16 went to the
   * writer server (and whatever `duringOutage` does), restarted on the same port; then 17 is written.
   */
  async function outage(duringOutage: () => Promise<unknown>, check: (outcome: Outage) => Promise<void> | void): Promise<void> {
    const uid = unique("u");
    const watched = new PrefdServer(database.url, await freePort());
    await watched.start();
    const client = createPrefdClient({ target: watched.target, token: token("admin"), deadlineMs: 2_000 });
    try {
      await writer.preferences.setPreferences(setRequest(userScope(uid), { [KEY]: 10 }));
      const view = await client.preferencesView(uid, "", { graceMs: 500, backoff: FAST });
      const recorder = new ChangeRecorder(view);
      await writer.preferences.setPreferences(setRequest(userScope(uid), { [KEY]: 11 }));
      await recorder.waitFor(() => view.get(KEY) === 11, 10_000, "11 before the outage");

      await watched.kill();
      for (let n = 12; n <= 16; n++) {
        await writer.preferences.setPreferences(setRequest(userScope(uid), { [KEY]: n }));
      }
      await duringOutage();
      await until(() => view.stale, 5_000, "the view to go stale");
      assert.equal(view.get(KEY), 11, "the last known value is still served");

      await watched.start();
      await recorder.waitFor(() => view.get(KEY) === 16, 20_000, "16 after the restart");
      // One more write: the feed delivers it after everything written during the outage.
      await writer.preferences.setPreferences(setRequest(userScope(uid), { [KEY]: 17 }));
      await recorder.waitFor(() => view.get(KEY) === 17, 10_000, "17 after the restart");
      await until(() => !view.stale, 5_000, "the view to be healthy");
      const reply = await writer.preferences.getEffectivePreferences({ subject: { userId: uid } });
      const expected = Object.fromEntries(reply.values.map((value) => [value.key, typedValue(value.value)]));
      await check({ view, recorder, expected });
    } finally {
      await client.close();
      await watched.dispose();
    }
  }

  test("no update is lost across a server kill and restart with writes during the outage", async () => {
    await outage(
      async () => undefined,
      ({ view, recorder, expected }) => {
        // Every change made while the server was down arrives from the resumed cursor; each carries
        // the key's effective value now, so the listener sees 11 -> 16 once.
        assert.equal(view.changesApplied, 7); // 11, then 12..16 replayed, then 17
        assert.deepEqual(recorder.valuesOf(KEY), [11, 16, 17]);
        assert.deepEqual(view.asFlatObject(), expected);
        assert.equal(view.snapshots, 1);
        assert.ok(view.reconnects >= 1);
        assert.equal(view.provenance(KEY)?.version, 8n);
      },
    );
  });

  test("compaction during the outage forces a re-snapshot that converges", async () => {
    await outage(
      () => database.purge(),
      ({ view, recorder, expected }) => {
        assert.equal(view.snapshots, 2, "the resumed cursor was compacted away");
        assert.deepEqual(view.asFlatObject(), expected);
        assert.deepEqual(recorder.valuesOf(KEY), [11, 16, 17]);
        assert.equal(view.provenance(KEY)?.version, 8n);
      },
    );
  });
});
