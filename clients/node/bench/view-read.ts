/**
 * A live view's local read next to GetEffectivePreferences of the same key over the network, from
 * the same Node process and client against a real prefd server (a fresh database, prefd as a
 * child process, as the tests make them); prints JSON.
 *
 *     npm run bench              (options: npm run bench -- --reads 200000 --evals 50000 --calls 500)
 *
 * What it measures
 *     local read: `view.get(key)` of a subject with overrides at ORG and USER, each call timed
 *         alone with process.hrtime.bigint (--reads calls), the empty timing's own cost measured the
 *         same way beside it (not subtracted); and the same reads in batches of 1,000, one clock read
 *         per batch, per read.
 *     OpenFeature evaluation: `await flags.getNumberValue(key, 0, { targetingKey, org })` through the
 *         OpenFeature server SDK and PrefdProvider (prefd-client/openfeature) for the same subject,
 *         whose view is already open, each evaluation timed alone (--evals evaluations), next to the
 *         bare `view.get(key)` above: the SDK's evaluation path (context merge, hooks, a promise)
 *         around the same in-memory read; and the provider's own part, `await
 *         provider.resolveNumberEvaluation(key, 0, context)` called directly, timed the same way.
 *     network read (the baseline): GetEffectivePreferences of the same key (key_prefixes) through
 *         the same client, serial, --calls calls after 20 warm-up calls.
 */

import { parseArgs } from "node:util";

import { OpenFeature } from "@openfeature/server-sdk";

import { createPrefdClient, toTypedValue, ScopeKind } from "../src/index.js";
import { PrefdProvider } from "../src/openfeature.js";
import { FreshDatabase, PrefdServer, token } from "../test/support/prefd.js";

const KEY = "display.items_per_page";
const BATCH = 1_000;

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN;
}

function summary(samplesNs: number[], digits = 3): { median_us: number; p99_us: number } {
  const sorted = [...samplesNs].sort((a, b) => a - b);
  return {
    median_us: +(quantile(sorted, 0.5) / 1_000).toFixed(digits),
    p99_us: +(quantile(sorted, 0.99) / 1_000).toFixed(digits),
  };
}

const { values: args } = parseArgs({
  options: {
    reads: { type: "string", default: "200000" },
    evals: { type: "string", default: "50000" },
    calls: { type: "string", default: "500" },
  },
});
const evals = Math.max(1_000, Number(args.evals));
const reads = Math.max(BATCH, Number(args.reads));
const calls = Math.max(10, Number(args.calls));

const database = await FreshDatabase.create();
const server = new PrefdServer(database.url);
try {
  await server.start();
  const client = createPrefdClient({ target: server.target, token: token("admin"), deadlineMs: 10_000 });
  try {
    const write = (kind: ScopeKind, id: string, value: number) =>
      client.preferences.setPreferences({ scope: { kind, id }, writes: [{ key: KEY, value: toTypedValue(value) }] });
    await write(ScopeKind.ORG, "bench-org", 40);
    await write(ScopeKind.USER, "bench-user", 50);
    const view = await client.preferencesView("bench-user", "bench-org");
    if (view.get(KEY) !== 50) {
      throw new Error(`the view reads ${String(view.get(KEY))}, not 50`);
    }

    let sink = 0;
    for (let i = 0; i < 50_000; i++) {
      sink += view.get(KEY) === 50 ? 1 : 0; // warm-up
    }
    const clock = process.hrtime.bigint;
    const alone: number[] = [];
    const empty: number[] = [];
    for (let i = 0; i < reads; i++) {
      let started = clock();
      sink += view.get(KEY) === 50 ? 1 : 0;
      alone.push(Number(clock() - started));
      started = clock();
      empty.push(Number(clock() - started));
    }
    const batched: number[] = [];
    for (let batch = 0; batch < reads / BATCH; batch++) {
      const started = clock();
      for (let i = 0; i < BATCH; i++) {
        sink += view.get(KEY) === 50 ? 1 : 0;
      }
      batched.push(Number(clock() - started) / BATCH);
    }

    const provider = new PrefdProvider({ target: server.target, token: token("admin"), timeoutMs: 10_000 });
    await OpenFeature.setProviderAndWait(provider);
    const flags = OpenFeature.getClient();
    const context = { targetingKey: "bench-user", org: "bench-org" };
    const first = await flags.getNumberDetails(KEY, 0, context); // opens the subject's view
    if (first.value !== 50 || first.reason !== "TARGETING_MATCH") {
      throw new Error(`the provider answers ${JSON.stringify(first)}, not 50 from the USER layer`);
    }
    for (let i = 0; i < 20_000; i++) {
      sink += (await flags.getNumberValue(KEY, 0, context)) === 50 ? 1 : 0; // warm-up
    }
    const evaluations: number[] = [];
    for (let i = 0; i < evals; i++) {
      const started = clock();
      const value = await flags.getNumberValue(KEY, 0, context);
      evaluations.push(Number(clock() - started));
      sink += value === 50 ? 1 : 0;
    }
    const resolutions: number[] = [];
    for (let i = 0; i < evals; i++) {
      const started = clock();
      const resolved = await provider.resolveNumberEvaluation(KEY, 0, context);
      resolutions.push(Number(clock() - started));
      sink += resolved.value === 50 ? 1 : 0;
    }
    await OpenFeature.close();

    const request = { subject: { userId: "bench-user", orgId: "bench-org" }, keyPrefixes: [KEY] };
    for (let i = 0; i < 20; i++) {
      await client.preferences.getEffectivePreferences(request);
    }
    const network: number[] = [];
    for (let i = 0; i < calls; i++) {
      const started = clock();
      const reply = await client.preferences.getEffectivePreferences(request);
      network.push(Number(clock() - started));
      sink += reply.values.length;
    }

    const local = summary(alone);
    const openfeature = summary(evaluations);
    const remote = summary(network, 1);
    console.log(
      JSON.stringify(
        {
          benchmark: "view-read",
          node: process.version,
          key: KEY,
          local_read: { n: alone.length, ...local, timer_itself: summary(empty) },
          local_read_batched: { n: batched.length * BATCH, ...summary(batched, 4) },
          openfeature_evaluation: { n: evaluations.length, ...openfeature },
          provider_resolve: { n: resolutions.length, ...summary(resolutions) },
          openfeature_over_view_get_median: +(openfeature.median_us / local.median_us).toFixed(1),
          get_effective_preferences: { n: network.length, ...remote },
          network_over_local_median: Math.round(remote.median_us / local.median_us),
          reads_checked: sink,
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
