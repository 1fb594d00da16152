/**
 * Real prefd servers for the tests and the bench: a fresh PostgreSQL database per run, `python -m
 * prefd_server serve` as a child process on a free port, and HS256 tokens signed with its secret.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import pg from "pg";

import {
  ScopeKind,
  createPrefdClient,
  toTypedValue,
  type KeyChange,
  type PrefdClient,
  type PreferenceValue,
  type PreferencesView,
} from "../../src/index.js";

/** The repository root (this file is clients/node/{test,dist/test}/support/prefd.{ts,js}). */
export const ROOT = resolve(
  dirname(fileURLToPath(import.meta.url)),
  ...(fileURLToPath(import.meta.url).includes(`${join("dist", "test")}`) ? ["..", "..", "..", "..", ".."] : ["..", "..", "..", ".."]),
);

/** The interpreter that runs prefd: PREFD_PYTHON, else the repository's venv. */
export const PYTHON = process.env.PREFD_PYTHON || join(ROOT, ".venv", "bin", "python");

/** The server-side PostgreSQL the test databases are created on. */
const SERVER_URL = process.env.DATABASE_URL || "postgresql://postgres@127.0.0.1:5432/postgres";

/** The signing secret of this run's servers (HS256). */
export const SECRET = `node-test-secret-${randomBytes(24).toString("hex")}`;

/** A signed token as prefd mints them: sub, roles, org, iat, exp (and extra permissions). */
export function token(
  role: "user" | "service" | "admin" = "admin",
  sub = "ops",
  options: { org?: string; ttlS?: number; secret?: string; permissions?: string[] } = {},
): string {
  const now = Math.floor(Date.now() / 1000);
  const claims: Record<string, unknown> = { sub, roles: [role], iat: now, exp: now + (options.ttlS ?? 600) };
  if (options.org) {
    claims.org = options.org;
  }
  if (options.permissions?.length) {
    claims.permissions = options.permissions;
  }
  const encode = (part: object): string => Buffer.from(JSON.stringify(part)).toString("base64url");
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  const signature = createHmac("sha256", options.secret ?? SECRET).update(body).digest("base64url");
  return `${body}.${signature}`;
}

/** An id no other test uses. */
export function unique(prefix = "t"): string {
  return `${prefix}${randomBytes(5).toString("hex")}`;
}

/** `url` pointing at database `name`. */
function withDatabase(url: string, name: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${name}`;
  return parsed.toString();
}

/** A fresh database `prefd_node_<random>` on DATABASE_URL's server; `drop()` removes it. */
export class FreshDatabase {
  readonly name = `prefd_node_${randomBytes(6).toString("hex")}`;
  readonly url = withDatabase(SERVER_URL, this.name);

  static async create(): Promise<FreshDatabase> {
    const database = new FreshDatabase();
    await adminQuery(`CREATE DATABASE ${database.name}`);
    return database;
  }

  async drop(): Promise<void> {
    await adminQuery(`DROP DATABASE IF EXISTS ${this.name} WITH (FORCE)`);
  }

  /** `prefd purge --older-than 0s`: compacts the change history of this database. */
  async purge(): Promise<string> {
    const { code, output } = await run(PYTHON, ["-m", "prefd_server", "purge", "--older-than", "0s"], {
      DATABASE_URL: this.url,
    });
    if (code !== 0) {
      throw new Error(`prefd purge failed (${code}):\n${output}`);
    }
    return output;
  }
}

async function adminQuery(sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: SERVER_URL });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

function run(command: string, args: string[], env: Record<string, string>): Promise<{ code: number; output: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolvePromise({ code: code ?? -1, output }));
  });
}

/** PEM files of a test PKI (made with the venv's `cryptography`): the CA, a server certificate for
 * localhost and 127.0.0.1, and a client certificate (CN trading-engine), each with its key. */
export interface Pki {
  directory: string;
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  dispose(): void;
}

export async function makePki(): Promise<Pki> {
  const directory = mkdtempSync(join(tmpdir(), "prefd-node-pki-"));
  const script = join(ROOT, "clients", "node", "test", "support", "make_pki.py");
  const { code, output } = await run(PYTHON, [script, directory], {});
  if (code !== 0) {
    throw new Error(`making the test PKI failed (${code}):\n${output}`);
  }
  return {
    directory,
    ca: join(directory, "ca.pem"),
    serverCert: join(directory, "server.pem"),
    serverKey: join(directory, "server.key"),
    clientCert: join(directory, "client.pem"),
    clientKey: join(directory, "client.key"),
    dispose: () => rmSync(directory, { recursive: true, force: true }),
  };
}

/** A TCP port nothing listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolvePromise(port));
    });
  });
}

/** `prefd serve` as a child process. */
export class PrefdServer {
  port = 0;
  readonly output: string[] = [];
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private readonly dataDir = mkdtempSync(join(tmpdir(), "prefd-node-"));

  /** `requestedPort` 0: any free port (the server prints the one it bound). */
  constructor(
    readonly databaseUrl: string,
    private readonly requestedPort = 0,
    private readonly extraEnv: Record<string, string> = {},
  ) {}

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Start the server; resolves once it prints its port (within `startupMs`). */
  async start(startupMs = 60_000): Promise<this> {
    const child = spawn(PYTHON, ["-m", "prefd_server", "serve"], {
      cwd: ROOT,
      env: {
        ...process.env,
        DATABASE_URL: this.databaseUrl,
        PREFD_JWT_SECRET: SECRET,
        PREFD_PORT: String(this.requestedPort),
        PREFD_HOST: "127.0.0.1",
        PREFD_PRINT_TOKEN: "false",
        PREFD_LOG_LEVEL: "WARNING",
        PREFD_DATA_DIR: this.dataDir,
        PREFD_WATCH_PROGRESS_INTERVAL_S: "0.5",
        PREFD_GRACE_PERIOD_S: "1",
        ...this.extraEnv,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    this.exited = new Promise((resolveExit) => child.once("exit", () => resolveExit()));
    const port = await new Promise<number>((resolvePort, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`prefd did not start within ${startupMs} ms:\n${this.output.join("")}`));
      }, startupMs);
      let pending = "";
      const onData = (chunk: Buffer): void => {
        const text = chunk.toString();
        this.output.push(text);
        pending += text;
        const match = /prefd serving on port (\d+)/.exec(pending);
        if (match) {
          clearTimeout(timer);
          resolvePort(Number(match[1]));
        }
      };
      child.stdout?.on("data", onData);
      child.stderr?.on("data", (chunk: Buffer) => this.output.push(chunk.toString()));
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`prefd exited early (${code ?? signal}):\n${this.output.join("")}`));
      });
    });
    this.port = port;
    return this;
  }

  /** Kill the server at once (SIGKILL: no graceful shutdown, streams just break). */
  async kill(): Promise<void> {
    if (this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
    }
    await this.exited;
    this.child = undefined;
  }

  /** Kill the server and remove its data directory. */
  async dispose(): Promise<void> {
    await this.kill();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/**
 * Wait until `check()` holds, for state with no event to wait on (another process's, or the
 * passing of a grace period); fails with `what` at the deadline.
 */
export async function until(check: () => boolean | Promise<boolean>, deadlineMs: number, what = "condition"): Promise<void> {
  const deadline = performance.now() + deadlineMs;
  while (!(await check())) {
    if (performance.now() > deadline) {
      throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    }
    await new Promise((resolveTick) => setTimeout(resolveTick, 20));
  }
}

/** Collects a view's onChange calls; `waitFor` resolves when the recorded changes satisfy a predicate. */
export class ChangeRecorder {
  readonly changes: KeyChange[] = [];
  private readonly waiters = new Set<() => void>();

  constructor(view: PreferencesView) {
    view.onChange((changes) => {
      this.changes.push(...changes);
      for (const wake of [...this.waiters]) {
        wake();
      }
    });
  }

  /** The new values `key` took, in order. */
  valuesOf(key: string): Array<KeyChange["new"]> {
    return this.changes.filter((change) => change.key === key).map((change) => change.new);
  }

  /** Resolves once `predicate()` holds (checked now and after each change); rejects at the deadline. */
  waitFor(predicate: () => boolean, deadlineMs: number, what = "a change"): Promise<void> {
    if (predicate()) {
      return Promise.resolve();
    }
    return new Promise((resolveWait, reject) => {
      const wake = (): void => {
        if (predicate()) {
          clearTimeout(timer);
          this.waiters.delete(wake);
          resolveWait();
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(wake);
        reject(new Error(`timed out after ${deadlineMs} ms waiting for ${what}; saw ${JSON.stringify(this.changes, jsonSafe)}`));
      }, deadlineMs);
      this.waiters.add(wake);
    });
  }
}

function jsonSafe(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? `${value}n` : value;
}

/** SetPreferences of plain values at a scope. */
export function setRequest(
  scope: { kind: ScopeKind; id: string },
  values: Record<string, PreferenceValue>,
): { scope: { kind: ScopeKind; id: string }; writes: Array<{ key: string; value: ReturnType<typeof toTypedValue> }> } {
  return { scope, writes: Object.entries(values).map(([key, value]) => ({ key, value: toTypedValue(value) })) };
}

export const userScope = (id: string): { kind: ScopeKind; id: string } => ({ kind: ScopeKind.USER, id });
export const orgScope = (id: string): { kind: ScopeKind; id: string } => ({ kind: ScopeKind.ORG, id });

/** A fresh database, a prefd server on it and an admin client on that server: what a suite's tests share. */
export interface Suite {
  database: FreshDatabase;
  server: PrefdServer;
  admin: PrefdClient;
}

/** Open a suite's database, server and admin client (in its `before`). */
export async function openSuite(): Promise<Suite> {
  const database = await FreshDatabase.create();
  const server = await new PrefdServer(database.url).start();
  return { database, server, admin: createPrefdClient({ target: server.target, token: token("admin") }) };
}

/** Close what openSuite opened, whatever of it was opened (in its `after`). */
export async function closeSuite(suite: Partial<Suite>): Promise<void> {
  await suite.admin?.close();
  await suite.server?.dispose();
  await suite.database?.drop();
}
