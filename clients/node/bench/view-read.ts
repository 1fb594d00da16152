/**
 * A live view's local read next to GetEffectivePreferences over the network, from the same Node
 * process against the same real prefd server (a fresh database, as the tests make one); prints JSON.
 *
 *     npm run bench              (options: -- --reads 200000 --calls 500)
 *
 * Local reads are timed in batches of 1,000 (one clock read per batch, so the clock's own cost
 * does not swamp a read); each network call is timed alone, one after another.
 */

import { parseArgs } from "node:util";

import { createPrefdClient, toTypedValue, ScopeKind } from "../src/index.js";
import { FreshDatabase, PrefdServer, token, unique } from "../test/support/prefd.js";

const BATCH = 1_000;

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN;
}

const { values: args } = parseArgs({
  options: {
    reads: { type: "string", default: "200000" },
    calls: { type: "string", default: "500" },
  },
});
const reads = Math.max(BATCH, Number(args.reads));
const calls = Math.max(10, Number(args.calls));

const database = await FreshDatabase.create();
const server = new PrefdServer(database.url);
try {
  await server.start();
  const client = createPrefdClient({ target: server.target, token: token("admin") });
  try {
    const uid = unique("bench");
    await client.preferences.setPreferences({
      scope: { kind: ScopeKind.USER, id: uid },
      writes: [{ key: "risk_management.max_position_size_percent", value: toTypedValue(7.5) }],
    });
    const view = await client.preferencesView(uid);
    const key = "risk_management.max_position_size_percent";
    if (view.get(key) !== 7.5) {
      throw new Error(`the view reads ${String(view.get(key))}, not 7.5`);
    }

    // Local reads: warm up, then batches.
    let sink = 0;
    for (let i = 0; i < 50_000; i++) {
      sink += view.getNumber(key);
    }
    const localNs: number[] = [];
    for (let batch = 0; batch < reads / BATCH; batch++) {
      const started = process.hrtime.bigint();
      for (let i = 0; i < BATCH; i++) {
        sink += view.getNumber(key);
      }
      localNs.push(Number(process.hrtime.bigint() - started) / BATCH);
    }

    // Network reads of the same subject (served from the server's cache after the first).
    const request = { subject: { userId: uid } };
    for (let i = 0; i < 20; i++) {
      await client.preferences.getEffectivePreferences(request);
    }
    const networkNs: number[] = [];
    for (let i = 0; i < calls; i++) {
      const started = process.hrtime.bigint();
      const reply = await client.preferences.getEffectivePreferences(request);
      networkNs.push(Number(process.hrtime.bigint() - started));
      sink += reply.values.length;
    }

    localNs.sort((a, b) => a - b);
    networkNs.sort((a, b) => a - b);
    const localMedian = quantile(localNs, 0.5);
    const networkMedian = quantile(networkNs, 0.5);
    console.log(
      JSON.stringify(
        {
          benchmark: "view-read",
          node: process.version,
          keys_in_view: view.keys().length,
          local_reads: localNs.length * BATCH,
          local_read_median_us: +(localMedian / 1_000).toFixed(4),
          local_read_p99_us: +(quantile(localNs, 0.99) / 1_000).toFixed(4),
          get_effective_calls: networkNs.length,
          get_effective_median_us: +(networkMedian / 1_000).toFixed(1),
          get_effective_p99_us: +(quantile(networkNs, 0.99) / 1_000).toFixed(1),
          network_over_local: Math.round(networkMedian / localMedian),
          checksum: sink > 0,
        },
        null,
        2,
      ),
    );
  } finally {
    await client.close();
  }
} finally {
  await server.dispose();
  await database.drop();
}
