/** prefd's TypeScript client: typed gRPC clients for every prefd service and live local views. The
 * OpenFeature provider is the `prefd-client/openfeature` entry (src/openfeature.ts), kept out of this
 * one so that apps without `@openfeature/server-sdk` never load it. */

export {
  createPrefdClient,
  RETRYABLE_READS,
  SERVER_MIN_PING_INTERVAL_MS,
  type KeepaliveOptions,
  type PrefdClient,
  type PrefdClientOptions,
  type RetryOptions,
  type TlsOptions,
  type TokenProvider,
} from "./client.js";
export { codeName, PrefdError, StaleViewError } from "./errors.js";
export {
  PreferencesView,
  type BackoffOptions,
  type KeyChange,
  type PreferencesViewOptions,
  type ViewLogger,
} from "./view.js";
export { sameValue, toTypedValue, typedValue, type PreferenceValue } from "./values.js";
export { Code } from "@connectrpc/connect";
export * from "./gen/prefd/v1/ai_config_pb.js";
export * from "./gen/prefd/v1/audit_pb.js";
export * from "./gen/prefd/v1/common_pb.js";
export * from "./gen/prefd/v1/health_pb.js";
export * from "./gen/prefd/v1/notifications_pb.js";
export * from "./gen/prefd/v1/preferences_pb.js";
export * from "./gen/prefd/v1/statistics_pb.js";
export * from "./gen/prefd/v1/templates_pb.js";
