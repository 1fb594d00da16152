/**
 * The client against a real prefd server: typed reads and writes on every service, typed errors
 * decoded from the status details, retries of idempotent reads only, deadlines, and tokens.
 */

import assert from "node:assert/strict";
import { connect, createServer, type Server, type Socket } from "node:net";
import { after, before, describe, test } from "node:test";

import type { Interceptor } from "@connectrpc/connect";

import {
  AIConfigService,
  AuditService,
  Code,
  createPrefdClient,
  file_prefd_v1_ai_config,
  file_prefd_v1_audit,
  file_prefd_v1_common,
  file_prefd_v1_health,
  file_prefd_v1_notifications,
  file_prefd_v1_preferences,
  file_prefd_v1_statistics,
  file_prefd_v1_templates,
  HealthService,
  Layer,
  NotificationService,
  PrefdError,
  PreferencesService,
  SERVER_MIN_PING_INTERVAL_MS,
  StatisticsService,
  TemplateService,
  typedValue,
  type PrefdClient,
} from "../src/index.js";
import { closeSuite, freePort, FreshDatabase, openSuite, PrefdServer, setRequest, token, unique, userScope } from "./support/prefd.js";

const HTTP2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
const PING = 0x6;
const GOAWAY = 0x7;
const ACK = 0x1;

/** HTTP/2 frames (type, flags) in one direction of a plaintext connection, as they go by. */
class FrameReader {
  private pending = Buffer.alloc(0);
  private prefaceLeft: number;

  constructor(
    fromClient: boolean,
    private readonly onFrame: (type: number, flags: number) => void,
  ) {
    this.prefaceLeft = fromClient ? HTTP2_PREFACE.length : 0;
  }

  push(chunk: Buffer): void {
    this.pending = Buffer.concat([this.pending, chunk]);
    if (this.prefaceLeft > 0) {
      const skipped = Math.min(this.prefaceLeft, this.pending.length);
      this.pending = this.pending.subarray(skipped);
      this.prefaceLeft -= skipped;
    }
    while (this.pending.length >= 9) {
      const length = this.pending.readUIntBE(0, 3);
      if (this.pending.length < 9 + length) {
        return;
      }
      this.onFrame(this.pending[3] as number, this.pending[4] as number);
      this.pending = this.pending.subarray(9 + length);
    }
  }
}

/** A TCP relay to `target` that counts connections, the client's PINGs, their ACKs and GOAWAYs. */
class FrameCountingRelay {
  connections = 0;
  clientPings = 0;
  serverPingAcks = 0;
  serverGoaways = 0;
  private readonly sockets = new Set<Socket>();
  private readonly server: Server;
  private readonly waiters = new Set<() => void>();

  constructor(targetPort: number) {
    this.server = createServer((client) => {
      this.connections += 1;
      const upstream = connect(targetPort, "127.0.0.1");
      this.sockets.add(client).add(upstream);
      const up = new FrameReader(true, (type, flags) => {
        if (type === PING && (flags & ACK) === 0) {
          this.clientPings += 1;
        }
      });
      const down = new FrameReader(false, (type, flags) => {
        if (type === PING && (flags & ACK) !== 0) {
          this.serverPingAcks += 1;
          this.wake();
        } else if (type === GOAWAY) {
          this.serverGoaways += 1;
        }
      });
      client.on("data", (chunk: Buffer) => {
        up.push(chunk);
        upstream.write(chunk);
      });
      upstream.on("data", (chunk: Buffer) => {
        down.push(chunk);
        client.write(chunk);
      });
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
      client.on("error", () => upstream.destroy());
      upstream.on("error", () => client.destroy());
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    const address = this.server.address();
    return typeof address === "object" && address !== null ? address.port : 0;
  }

  /** Resolves once the server has acknowledged `count` PINGs. */
  pingAcks(count: number, deadlineMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const wake = (): void => {
        if (this.serverPingAcks >= count) {
          clearTimeout(timer);
          this.waiters.delete(wake);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(wake);
        reject(new Error(`timed out after ${deadlineMs} ms waiting for ${count} PING ACKs; saw ${this.serverPingAcks}`));
      }, deadlineMs);
      this.waiters.add(wake);
      wake();
    });
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) {
      socket.destroy();
    }
    await new Promise((resolve) => this.server.close(resolve));
  }

  private wake(): void {
    for (const waiter of [...this.waiters]) {
      waiter();
    }
  }
}

/** The error a promise rejects with (fails when it resolves). */
async function rejection(promise: Promise<unknown>): Promise<PrefdError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof PrefdError, `not a PrefdError: ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

describe("prefd client", () => {
  let database: FreshDatabase;
  let server: PrefdServer;
  let admin: PrefdClient;

  before(async () => {
    ({ database, server, admin } = await openSuite());
  });

  after(async () => {
    await closeSuite({ database, server, admin });
  });

  test("writes and reads effective values with provenance and a cursor", async () => {
    const uid = unique("u");
    const written = await admin.preferences.setPreferences(
      setRequest(userScope(uid), { "display.items_per_page": 40, "display.theme": "dark" }),
    );
    assert.deepEqual(
      written.changes.map((change) => [change.key, change.newVersion]),
      [
        ["display.items_per_page", 1n],
        ["display.theme", 1n],
      ],
    );
    const reply = await admin.preferences.getEffectivePreferences({
      subject: { userId: uid },
      keyPrefixes: ["display."],
    });
    const byKey = new Map(reply.values.map((value) => [value.key, value]));
    assert.equal(typedValue(byKey.get("display.items_per_page")?.value), 40);
    assert.equal(typedValue(byKey.get("display.theme")?.value), "dark");
    assert.equal(byKey.get("display.theme")?.provenance?.layer, Layer.USER);
    assert.equal(byKey.get("display.theme")?.provenance?.version, 1n);
    assert.equal(byKey.get("display.dashboard_layout")?.provenance?.layer, Layer.DEFAULT);
    assert.ok(reply.cursor?.token, "a read returns the cursor it is consistent with");
    assert.ok([...byKey.keys()].every((key) => key.startsWith("display.")));
  });

  test("INVALID_ARGUMENT carries the ErrorInfo reason and the BadRequest field violations", async () => {
    const uid = unique("u");
    const error = await rejection(
      admin.preferences.setPreferences(
        setRequest(userScope(uid), { "display.items_per_page": "many", "display.theme": "dark" }),
      ),
    );
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_ARGUMENT");
    assert.deepEqual(Object.keys(error.violations), ["writes[0].value"]);
    assert.match(error.violations["writes[0].value"] ?? "", /display\.items_per_page must be an int/);
    // A refused write changes nothing.
    const reply = await admin.preferences.listPreferences({ scope: userScope(uid) });
    assert.deepEqual(reply.preferences, []);
  });

  test("PERMISSION_DENIED for another user's subject, while the user's own is readable", async () => {
    const mallory = createPrefdClient({ target: server.target, token: token("user", "mallory") });
    try {
      const error = await rejection(mallory.preferences.getEffectivePreferences({ subject: { userId: "alice" } }));
      assert.equal(error.code, Code.PermissionDenied);
      assert.equal(error.reason, "PERMISSION_DENIED");
      assert.equal(error.errorMetadata.action, "read");
      const own = await mallory.preferences.getEffectivePreferences({ subject: { userId: "mallory" } });
      assert.ok(own.values.length > 0);
    } finally {
      await mallory.close();
    }
  });

  test("UNAUTHENTICATED for a malformed token, a foreign signature, an expired token and none", async () => {
    const tokens = [
      "not-a-token",
      token("admin", "ops", { secret: "another-secret-of-enough-length-for-hs256" }),
      token("admin", "ops", { ttlS: -60 }),
      undefined,
    ];
    for (const bad of tokens) {
      const client = createPrefdClient({ target: server.target, ...(bad !== undefined && { token: bad }) });
      try {
        const error = await rejection(client.preferences.getEffectivePreferences({ subject: { userId: "alice" } }));
        assert.equal(error.code, Code.Unauthenticated, `${String(bad)}: ${error.message}`);
        assert.equal(error.reason, "UNAUTHENTICATED");
      } finally {
        await client.close();
      }
    }
  });

  test("every RPC of every prefd service is a typed method, and each service answers", async () => {
    const services = [
      [admin.preferences, PreferencesService],
      [admin.aiConfig, AIConfigService],
      [admin.audit, AuditService],
      [admin.health, HealthService],
      [admin.notifications, NotificationService],
      [admin.templates, TemplateService],
      [admin.statistics, StatisticsService],
    ] as const;
    let methods = 0;
    for (const [client, service] of services) {
      for (const method of service.methods) {
        assert.equal(typeof (client as Record<string, unknown>)[method.localName], "function", method.name);
        methods += 1;
      }
    }
    // Every service the contracts declare is there, with all 54 RPCs.
    const declared = [
      file_prefd_v1_ai_config,
      file_prefd_v1_audit,
      file_prefd_v1_common,
      file_prefd_v1_health,
      file_prefd_v1_notifications,
      file_prefd_v1_preferences,
      file_prefd_v1_statistics,
      file_prefd_v1_templates,
    ].flatMap((file) => file.services.map((service) => service.typeName));
    assert.deepEqual(services.map(([, service]) => service.typeName).sort(), declared.sort());
    assert.equal(methods, 54);
    const uid = unique("u");
    await admin.preferences.setPreferences(setRequest(userScope(uid), { "display.theme": "dark" }));
    const [health, models, changes, templates, statistics, consents] = await Promise.all([
      admin.health.getSystemHealth({}),
      admin.aiConfig.listModels({}),
      admin.audit.listChanges({ scope: userScope(uid) }),
      admin.templates.listTemplates({}),
      admin.statistics.getKeyStatistics({ key: "display.theme" }),
      admin.notifications.listConsents({ userId: uid }),
    ]);
    assert.ok(health.components.length > 0);
    assert.ok(models.models.length > 0);
    assert.deepEqual(
      changes.changes.map((change) => change.key),
      ["display.theme"],
    );
    assert.ok(Array.isArray(templates.templates));
    assert.equal(statistics.statistics?.key, "display.theme");
    assert.deepEqual(consents.consents, []);
  });

  test("idempotent reads are retried on UNAVAILABLE, writes are not", async () => {
    const attempts = new Map<string, number>();
    const counter: Interceptor = (next) => async (request) => {
      attempts.set(request.method.name, (attempts.get(request.method.name) ?? 0) + 1);
      return next(request);
    };
    const client = createPrefdClient({
      target: `127.0.0.1:${await freePort()}`,
      token: token("admin"),
      interceptors: [counter],
      retries: { maxAttempts: 3, initialBackoffMs: 10, maxBackoffMs: 20 },
    });
    try {
      const read = await rejection(client.preferences.getEffectivePreferences({ subject: { userId: "alice" } }));
      const write = await rejection(client.preferences.setPreferences(setRequest(userScope("alice"), { "display.theme": "dark" })));
      assert.equal(read.code, Code.Unavailable);
      assert.equal(write.code, Code.Unavailable);
      assert.deepEqual(Object.fromEntries(attempts), { GetEffectivePreferences: 3, SetPreferences: 1 });
    } finally {
      await client.close();
    }
  });

  test("a unary call ends with DEADLINE_EXCEEDED by its deadline against a server that never answers", async () => {
    const sockets = new Set<Socket>();
    const silent: Server = createServer((socket) => sockets.add(socket));
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const address = silent.address();
    const port = typeof address === "object" && address !== null ? address.port : 0;
    const client = createPrefdClient({ target: `127.0.0.1:${port}`, token: token("admin"), deadlineMs: 300 });
    try {
      const started = performance.now();
      const error = await rejection(client.preferences.getEffectivePreferences({ subject: { userId: "alice" } }));
      const elapsed = performance.now() - started;
      assert.equal(error.code, Code.DeadlineExceeded);
      assert.ok(elapsed >= 250 && elapsed < 3_000, `ended after ${elapsed} ms`);
      const own = await rejection(
        client.preferences.getEffectivePreferences({ subject: { userId: "alice" } }, { timeoutMs: 100 }),
      );
      assert.equal(own.code, Code.DeadlineExceeded);
    } finally {
      await client.close();
      for (const socket of sockets) {
        socket.destroy();
      }
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  test("keepalive pings at the interval the server accepts: answered, and the connection stays", async () => {
    const relay = new FrameCountingRelay(server.port);
    const port = await relay.listen();
    const client = createPrefdClient({
      target: `127.0.0.1:${port}`,
      token: token("admin"),
      keepalive: { intervalMs: SERVER_MIN_PING_INTERVAL_MS, timeoutMs: 5_000 },
    });
    try {
      await client.preferences.getEffectivePreferences({ subject: { userId: "alice" } });
      assert.equal(relay.clientPings, 0);
      // The connection is idle now: the client pings it after the interval, and the server answers.
      await relay.pingAcks(1, SERVER_MIN_PING_INTERVAL_MS + 5_000);
      assert.equal(relay.clientPings, 1);
      await client.preferences.getEffectivePreferences({ subject: { userId: "alice" } });
      assert.deepEqual([relay.connections, relay.serverGoaways], [1, 0], "the same connection, never sent away");
    } finally {
      await client.close();
      await relay.close();
    }
  });

  test("a token provider is asked on every call", async () => {
    const subjects: string[] = [];
    const client = createPrefdClient({
      target: server.target,
      tokenProvider: async () => {
        const sub = `svc${subjects.length}`;
        subjects.push(sub);
        return token("service", sub);
      },
    });
    try {
      await client.preferences.getEffectivePreferences({ subject: { userId: "alice" } });
      await client.preferences.getEffectivePreferences({ subject: { userId: "bob" } });
      assert.deepEqual(subjects, ["svc0", "svc1"]);
    } finally {
      await client.close();
    }
  });

  test("options the client cannot work with are refused when it is built", () => {
    const target = server.target;
    assert.throws(() => createPrefdClient({ target: "" }), TypeError);
    assert.throws(() => createPrefdClient({ target: "localhost" }), /names no port/);
    assert.throws(() => createPrefdClient({ target: "ftp://host:1" }), /scheme/);
    assert.throws(() => createPrefdClient({ target: `http://${target}`, tls: true }), /plaintext/);
    assert.throws(() => createPrefdClient({ target, token: "a", tokenProvider: () => "b" }), /either token or tokenProvider/);
    assert.throws(() => createPrefdClient({ target, keepalive: { intervalMs: 5_000 } }), /at most every 10000 ms/);
    assert.throws(() => createPrefdClient({ target, deadlineMs: 0 }), RangeError);
    assert.throws(() => createPrefdClient({ target, retries: { maxAttempts: 1.5 } }), /whole number/);
    assert.throws(() => createPrefdClient({ target, tls: { cert: "pem" } }), /private key/);
  });
});
