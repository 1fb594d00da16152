/**
 * The prefd client: one HTTP/2 connection speaking real gRPC (Connect's gRPC transport for
 * Node), a bearer token on every call, a default deadline on every unary call, retries of
 * idempotent reads on UNAVAILABLE with backoff, keepalive pings the server accepts, typed errors
 * (PrefdError), one typed method per RPC of every prefd service, and live views.
 */

import type { DescMessage, DescMethodStreaming, DescMethodUnary, MessageInitShape } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  type Client,
  type ContextValues,
  type Interceptor,
  type StreamResponse,
  type Transport,
  type UnaryResponse,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { PrefdError } from "./errors.js";
import { sleep } from "./timing.js";
import { AIConfigService } from "./gen/prefd/v1/ai_config_pb.js";
import { AuditService } from "./gen/prefd/v1/audit_pb.js";
import { HealthService } from "./gen/prefd/v1/health_pb.js";
import { NotificationService } from "./gen/prefd/v1/notifications_pb.js";
import { PreferencesService } from "./gen/prefd/v1/preferences_pb.js";
import { StatisticsService } from "./gen/prefd/v1/statistics_pb.js";
import { TemplateService } from "./gen/prefd/v1/templates_pb.js";
import { PreferencesView, type PreferencesViewOptions } from "./view.js";

/** What a transport takes as a call's request headers. */
type HeaderInit = Parameters<Transport["unary"]>[3];

/** Idempotent reads, retried on UNAVAILABLE (a restarting or briefly unreachable server). */
export const RETRYABLE_READS: ReadonlyMap<string, ReadonlySet<string>> = new Map(
  Object.entries({
    "prefd.v1.PreferencesService": [
      "GetEffectivePreferences",
      "BatchGetEffectivePreferences",
      "ListPreferences",
      "GetDefinition",
      "ListDefinitions",
    ],
    "prefd.v1.AIConfigService": [
      "GetAIConfig",
      "ListAIConfigs",
      "GetEffectiveAIConfig",
      "ListModels",
      "EstimateCost",
      "GetBudgetStatus",
    ],
    "prefd.v1.AuditService": ["ListChanges", "GetChange", "DiffScope", "PreviewRollback", "ExportUserData"],
    "prefd.v1.StatisticsService": ["GetKeyStatistics", "GetCategoryStatistics", "GetAdoption", "ListDailyRollups"],
    "prefd.v1.TemplateService": ["GetTemplate", "ListTemplates"],
    "prefd.v1.HealthService": [
      "GetSystemHealth",
      "GetDatabaseHealth",
      "GetMaintenanceOperation",
      "ListMaintenanceOperations",
    ],
  }).map(([service, methods]) => [service, new Set(methods)]),
);

/**
 * The least interval between keepalive pings prefd accepts on a connection without calls in
 * flight (prefd_server/app.py: grpc.http2.min_ping_interval_without_data_ms).
 */
export const SERVER_MIN_PING_INTERVAL_MS = 10_000;

/** Returns the bearer token for the next call (called once per call: it may refresh). */
export type TokenProvider = () => string | Promise<string>;

/** TLS to a prefd server whose port speaks TLS (PEM strings or buffers). */
export interface TlsOptions {
  /** CA certificates to trust; the system's roots when unset. */
  ca?: string | Buffer;
  /** A client certificate chain, when the server requires client certificates (mTLS). */
  cert?: string | Buffer;
  /** The client certificate's private key. */
  key?: string | Buffer;
  /** The name the server's certificate carries, when it is not the target's host. */
  serverName?: string;
}

/** How idempotent reads are retried on UNAVAILABLE: full jitter over an exponential cap. */
export interface RetryOptions {
  /** Attempts in all, the first included (default 4). */
  maxAttempts?: number;
  /** The first backoff cap (default 100 ms). */
  initialBackoffMs?: number;
  /** The largest backoff cap (default 2,000 ms). */
  maxBackoffMs?: number;
  /** How the cap grows per attempt (default 2). */
  multiplier?: number;
}

/** Keepalive pings on the connection (defaults: every 30 s, 10 s to answer, also when idle). */
export interface KeepaliveOptions {
  /** Interval between pings; at least SERVER_MIN_PING_INTERVAL_MS (default 30,000). */
  intervalMs?: number;
  /** How long a ping may go unanswered before the connection counts as dead (default 10,000). */
  timeoutMs?: number;
}

export interface PrefdClientOptions {
  /** `host:port` (plaintext unless `tls` is given), or a URL: `http://host:port`, `https://host:port`. */
  target: string;
  /** A bearer token (JWT). Give `token` or `tokenProvider`, or neither for a server that takes the
   * client certificate (mTLS) as the caller. */
  token?: string;
  /** Called before every call for the bearer token (for tokens that expire). */
  tokenProvider?: TokenProvider;
  /** TLS: `true` to trust the system's roots, or the certificates to use. */
  tls?: boolean | TlsOptions;
  /** The deadline of each unary call unless the call gives `timeoutMs` (default 5,000 ms).
   * Streams (WatchPreferences, ...) have none unless the call gives one. */
  deadlineMs?: number;
  /** Retries of idempotent reads on UNAVAILABLE (default on); `false` turns them off. */
  retries?: RetryOptions | false;
  /** Keepalive pings. */
  keepalive?: KeepaliveOptions;
  /** More interceptors, run inside the client's own (after auth, inside the retry loop). */
  interceptors?: Interceptor[];
}

/** A prefd client: `client.preferences.getEffectivePreferences({...})`, ..., and live views. */
export interface PrefdClient {
  /** prefd.v1.PreferencesService */
  readonly preferences: Client<typeof PreferencesService>;
  /** prefd.v1.AIConfigService */
  readonly aiConfig: Client<typeof AIConfigService>;
  /** prefd.v1.AuditService */
  readonly audit: Client<typeof AuditService>;
  /** prefd.v1.HealthService */
  readonly health: Client<typeof HealthService>;
  /** prefd.v1.NotificationService */
  readonly notifications: Client<typeof NotificationService>;
  /** prefd.v1.TemplateService */
  readonly templates: Client<typeof TemplateService>;
  /** prefd.v1.StatisticsService */
  readonly statistics: Client<typeof StatisticsService>;
  /** The transport every service client uses (typed errors, deadlines, auth and retries). */
  readonly transport: Transport;
  /**
   * A live view of a subject's effective preferences: resolves once its snapshot is loaded and
   * its watch is running; rejects with a PrefdError at once for a bad token, a subject the token
   * may not read, or an unreachable server.
   */
  preferencesView(userId: string, orgId?: string, options?: PreferencesViewOptions): Promise<PreferencesView>;
  /** Stop every view this client opened and close the connection. */
  close(): Promise<void>;
}

/** Build a prefd client. Throws TypeError/RangeError for options it cannot work with. */
export function createPrefdClient(options: PrefdClientOptions): PrefdClient {
  const baseUrl = baseUrlOf(options.target, options.tls);
  const deadlineMs = positive("deadlineMs", options.deadlineMs ?? 5_000);
  const tokenProvider = tokenProviderOf(options);
  const keepalive = keepaliveOf(options.keepalive);
  const retry = options.retries === false ? undefined : retryOf(options.retries ?? {});
  const sessionManager = new Http2SessionManager(
    baseUrl,
    {
      pingIntervalMs: keepalive.intervalMs,
      pingTimeoutMs: keepalive.timeoutMs,
      pingIdleConnection: true,
    },
    nodeOptionsOf(options.tls),
  );
  const interceptors: Interceptor[] = [];
  if (retry !== undefined) {
    interceptors.push(retryInterceptor(retry));
  }
  if (tokenProvider !== undefined) {
    interceptors.push(authInterceptor(tokenProvider));
  }
  interceptors.push(...(options.interceptors ?? []));
  const grpc = createGrpcTransport({ baseUrl, sessionManager, interceptors });
  const transport = typedTransport(grpc, deadlineMs);
  const views = new Set<PreferencesView>();
  const preferences = createClient(PreferencesService, transport);
  let closed = false;
  return {
    preferences,
    aiConfig: createClient(AIConfigService, transport),
    audit: createClient(AuditService, transport),
    health: createClient(HealthService, transport),
    notifications: createClient(NotificationService, transport),
    templates: createClient(TemplateService, transport),
    statistics: createClient(StatisticsService, transport),
    transport,
    async preferencesView(userId, orgId = "", viewOptions = {}) {
      if (closed) {
        throw new PrefdError("the client is closed", Code.FailedPrecondition);
      }
      const view = new PreferencesView(preferences, { userId, orgId }, { openTimeoutMs: deadlineMs, ...viewOptions });
      await view.start();
      views.add(view);
      view.onClose(() => views.delete(view));
      return view;
    },
    async close() {
      closed = true;
      await Promise.all([...views].map((view) => view.close()));
      sessionManager.abort();
    },
  };
}

/**
 * The gRPC transport with prefd's defaults: the client's deadline on every unary call that names
 * none, and every failure as a PrefdError (unary rejections and errors while reading a stream).
 */
function typedTransport(inner: Transport, deadlineMs: number): Transport {
  return {
    async unary<I extends DescMessage, O extends DescMessage>(
      method: DescMethodUnary<I, O>,
      signal: AbortSignal | undefined,
      timeoutMs: number | undefined,
      header: HeaderInit,
      input: MessageInitShape<I>,
      contextValues?: ContextValues,
    ): Promise<UnaryResponse<I, O>> {
      try {
        return await inner.unary(method, signal, timeoutMs ?? deadlineMs, header, input, contextValues);
      } catch (error) {
        throw PrefdError.from(fromConnection(error, signal));
      }
    },
    async stream<I extends DescMessage, O extends DescMessage>(
      method: DescMethodStreaming<I, O>,
      signal: AbortSignal | undefined,
      timeoutMs: number | undefined,
      header: HeaderInit,
      input: AsyncIterable<MessageInitShape<I>>,
      contextValues?: ContextValues,
    ): Promise<StreamResponse<I, O>> {
      let response: StreamResponse<I, O>;
      try {
        response = await inner.stream(method, signal, timeoutMs, header, input, contextValues);
      } catch (error) {
        throw PrefdError.from(fromConnection(error, signal));
      }
      const messages = response.message;
      return {
        ...response,
        message: {
          [Symbol.asyncIterator]() {
            const iterator = messages[Symbol.asyncIterator]();
            return {
              next: () =>
                iterator.next().catch((error: unknown) => Promise.reject(PrefdError.from(fromConnection(error, signal)))),
            };
          },
        },
      };
    },
  };
}

/** Codes Connect's Node transport gives failures of the connection itself (not the server's status). */
const CONNECTION_CODES = new Set([Code.Canceled, Code.Aborted, Code.Internal, Code.Unknown]);

/**
 * A failure without a status from the server that the caller did not cause (no abort) happened on
 * the connection: a reset or refused connection, a failed TLS handshake, a stream the peer closed.
 * gRPC calls that UNAVAILABLE (transient, retried for idempotent reads); Connect's Node transport
 * reports these as CANCELED, ABORTED or INTERNAL, so they are mapped here.
 */
function fromConnection(reason: unknown, signal: AbortSignal | undefined): ConnectError {
  const error = ConnectError.from(reason);
  if (signal?.aborted || !CONNECTION_CODES.has(error.code) || error.metadata.has("grpc-status")) {
    return error;
  }
  return new ConnectError(error.rawMessage, Code.Unavailable, error.metadata, undefined, error.cause ?? error);
}

function authInterceptor(tokenProvider: TokenProvider): Interceptor {
  return (next) => async (request) => {
    const token = await tokenProvider();
    if (token) {
      request.header.set("authorization", `Bearer ${token}`);
    }
    return next(request);
  };
}

interface RetryPolicy {
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
}

/** Retries idempotent unary reads on UNAVAILABLE within the call's one deadline. */
function retryInterceptor(policy: RetryPolicy): Interceptor {
  return (next) => async (request) => {
    if (request.stream || !RETRYABLE_READS.get(request.service.typeName)?.has(request.method.name)) {
      return next(request);
    }
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(request);
      } catch (error) {
        const failure = fromConnection(error, request.signal);
        if (failure.code !== Code.Unavailable || attempt >= policy.maxAttempts || request.signal.aborted) {
          throw failure;
        }
        const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
        await sleep(Math.random() * cap, request.signal);
      }
    }
  };
}

function baseUrlOf(target: string, tls: PrefdClientOptions["tls"]): string {
  if (typeof target !== "string" || target.trim() === "") {
    throw new TypeError("target: give host:port or an http:// or https:// URL");
  }
  const secure = tls !== undefined && tls !== false;
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(target) ? target : `${secure ? "https" : "http"}://${target}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new TypeError(`target: ${JSON.stringify(target)} is neither host:port nor a URL`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TypeError(`target: scheme ${url.protocol} is not http: or https:`);
  }
  if (url.protocol === "http:" && secure) {
    throw new TypeError("target: an http:// target is plaintext; use https:// (or host:port) with tls");
  }
  if (!url.port && !/^https?:\/\//i.test(target)) {
    throw new TypeError(`target: ${JSON.stringify(target)} names no port`);
  }
  return url.origin;
}

function tokenProviderOf(options: PrefdClientOptions): TokenProvider | undefined {
  if (options.token !== undefined && options.tokenProvider !== undefined) {
    throw new TypeError("give either token or tokenProvider, not both");
  }
  if (options.tokenProvider !== undefined) {
    if (typeof options.tokenProvider !== "function") {
      throw new TypeError("tokenProvider must be a function returning the token");
    }
    return options.tokenProvider;
  }
  if (options.token !== undefined) {
    if (typeof options.token !== "string") {
      throw new TypeError("token must be a string");
    }
    const token = options.token;
    return () => token;
  }
  return undefined;
}

function keepaliveOf(options: KeepaliveOptions = {}): Required<KeepaliveOptions> {
  const intervalMs = positive("keepalive.intervalMs", options.intervalMs ?? 30_000);
  if (intervalMs < SERVER_MIN_PING_INTERVAL_MS) {
    throw new RangeError(
      `keepalive.intervalMs: prefd accepts pings at most every ${SERVER_MIN_PING_INTERVAL_MS} ms (got ${intervalMs})`,
    );
  }
  return { intervalMs, timeoutMs: positive("keepalive.timeoutMs", options.timeoutMs ?? 10_000) };
}

function retryOf(options: RetryOptions): RetryPolicy {
  const maxAttempts = positive("retries.maxAttempts", options.maxAttempts ?? 4);
  if (!Number.isInteger(maxAttempts)) {
    throw new RangeError(`retries.maxAttempts must be a whole number (got ${maxAttempts})`);
  }
  const multiplier = positive("retries.multiplier", options.multiplier ?? 2);
  if (multiplier < 1) {
    throw new RangeError(`retries.multiplier must be at least 1 (got ${multiplier})`);
  }
  return {
    maxAttempts,
    initialBackoffMs: positive("retries.initialBackoffMs", options.initialBackoffMs ?? 100),
    maxBackoffMs: positive("retries.maxBackoffMs", options.maxBackoffMs ?? 2_000),
    multiplier,
  };
}

function nodeOptionsOf(tls: PrefdClientOptions["tls"]): import("node:http2").SecureClientSessionOptions {
  if (tls === undefined || typeof tls === "boolean") {
    return {};
  }
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    throw new TypeError("tls: a client certificate needs its private key, and a private key its certificate");
  }
  return {
    ...(tls.ca !== undefined && { ca: tls.ca }),
    ...(tls.cert !== undefined && { cert: tls.cert }),
    ...(tls.key !== undefined && { key: tls.key }),
    ...(tls.serverName !== undefined && { servername: tls.serverName }),
  };
}

function positive(name: string, value: number): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new RangeError(`${name} must be a positive number (got ${String(value)})`);
  }
  return value;
}
