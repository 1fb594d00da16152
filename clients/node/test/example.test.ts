/** The trading-engine example runs as the README says, against a real server, and does what it claims. */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";

import type { PrefdClient } from "../src/index.js";
import { closeSuite, FreshDatabase, openSuite, PrefdServer, ROOT, setRequest, token, unique, userScope } from "./support/prefd.js";

const EXAMPLE = join(ROOT, "clients", "node", "dist", "examples", "trading-engine.js");

let database: FreshDatabase;
let server: PrefdServer;
let admin: PrefdClient;

before(async () => {
  ({ database, server, admin } = await openSuite());
});

after(async () => {
  await closeSuite({ database, server, admin });
});

test("the trading engine applies new risk limits on change", async () => {
  const uid = unique("trader");
  const engine = spawn(process.execPath, [EXAMPLE, "--target", server.target, "--user", uid, "--changes", "1"], {
    env: { ...process.env, PREFD_TOKEN: token("service", "trading-engine") },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  engine.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => engine.once("exit", (code) => resolve(code)));
  const lines = createInterface({ input: engine.stdout })[Symbol.asyncIterator]();
  const deadline = setTimeout(() => engine.kill("SIGKILL"), 30_000);
  try {
    const next = async (): Promise<Record<string, any>> => {
      const line = await lines.next();
      assert.ok(!line.done, `the engine stopped: ${stderr}`);
      return JSON.parse(line.value) as Record<string, any>;
    };
    const ready = await next();
    const check = await next();
    assert.equal(ready.event, "ready");
    assert.equal(check.event, "order_check");
    assert.notEqual(ready.limits.max_daily_loss_percent, 1.5);
    assert.equal(typeof ready.limits.max_daily_trades, "number");
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "risk_management.max_daily_loss_percent": 1.5 }));
    const update = await next();
    assert.equal(update.event, "risk_limits_updated");
    assert.deepEqual(update.changed["risk_management.max_daily_loss_percent"], [ready.limits.max_daily_loss_percent, 1.5]);
    assert.equal(update.limits.max_daily_loss_percent, 1.5);
    assert.equal(await exited, 0, stderr);
  } finally {
    clearTimeout(deadline);
    engine.kill("SIGKILL");
  }
});
