/** TLS and mTLS to a real prefd server whose port speaks only TLS: the client trusts the CA it is
 * given, presents a client certificate when the server requires one, and fails at once otherwise. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";

import { Code, createPrefdClient, PrefdError, type PrefdClientOptions } from "../src/index.js";
import { ChangeRecorder, FreshDatabase, makePki, PrefdServer, setRequest, token, unique, userScope, type Pki } from "./support/prefd.js";

async function failure(options: PrefdClientOptions): Promise<PrefdError> {
  const client = createPrefdClient({ deadlineMs: 3_000, ...options });
  try {
    await client.preferences.getEffectivePreferences({ subject: { userId: "alice" } });
  } catch (error) {
    assert.ok(error instanceof PrefdError);
    return error;
  } finally {
    await client.close();
  }
  assert.fail("the call succeeded");
}

describe("TLS", () => {
  let database: FreshDatabase;
  let pki: Pki;
  let tls: PrefdServer;
  let mtls: PrefdServer;

  before(async () => {
    database = await FreshDatabase.create();
    pki = await makePki();
    const files = { PREFD_TLS_CERT_FILE: pki.serverCert, PREFD_TLS_KEY_FILE: pki.serverKey };
    tls = await new PrefdServer(database.url, 0, files).start();
    mtls = await new PrefdServer(database.url, 0, { ...files, PREFD_TLS_CLIENT_CA_FILE: pki.ca }).start();
  });

  after(async () => {
    await tls?.dispose();
    await mtls?.dispose();
    pki?.dispose();
    await database?.drop();
  });

  test("a client that trusts the server's CA reads, writes and watches over TLS", async () => {
    const client = createPrefdClient({
      target: `localhost:${tls.port}`,
      token: token("admin"),
      tls: { ca: readFileSync(pki.ca) },
    });
    try {
      const uid = unique("u");
      const view = await client.preferencesView(uid);
      const recorder = new ChangeRecorder(view);
      await client.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "dark" }));
      await recorder.waitFor(() => view.get("display.theme") === "dark", 10_000, "the change over TLS");
      assert.deepEqual(recorder.changes, [{ key: "display.theme", old: "light", new: "dark" }]);
    } finally {
      await client.close();
    }
  });

  test("a certificate the client cannot verify, or plaintext to a TLS port, fails at once", async () => {
    const started = performance.now();
    const untrusted = await failure({ target: `localhost:${tls.port}`, token: token("admin"), tls: true });
    assert.equal(untrusted.code, Code.Unavailable, untrusted.message);
    const wrongName = await failure({
      target: `localhost:${tls.port}`,
      token: token("admin"),
      tls: { ca: readFileSync(pki.ca), serverName: "prefd.example" },
    });
    assert.equal(wrongName.code, Code.Unavailable, wrongName.message);
    const plaintext = await failure({ target: `127.0.0.1:${tls.port}`, token: token("admin") });
    assert.equal(plaintext.code, Code.Unavailable, plaintext.message);
    assert.ok(performance.now() - started < 5_000);
  });

  test("under mTLS the client presents its certificate; without one the call is refused", async () => {
    const client = createPrefdClient({
      target: `127.0.0.1:${mtls.port}`,
      token: token("service", "trading-engine"),
      tls: { ca: readFileSync(pki.ca), cert: readFileSync(pki.clientCert), key: readFileSync(pki.clientKey) },
    });
    try {
      const reply = await client.preferences.getEffectivePreferences({ subject: { userId: "alice" } });
      assert.ok(reply.values.length > 0);
    } finally {
      await client.close();
    }
    const refused = await failure({ target: `127.0.0.1:${mtls.port}`, token: token("admin"), tls: { ca: readFileSync(pki.ca) } });
    assert.equal(refused.code, Code.Unavailable, refused.message);
  });
});
