/**
 * A trading engine that keeps a user's risk limits in memory and applies new ones the moment they
 * change.
 *
 *     PREFD_TOKEN=... node dist/examples/trading-engine.js --user alice --org acme
 *
 * Every order check reads the limits from the live view (no network round trip); `onChange` swaps
 * in new limits as soon as prefd commits them. Prints one JSON object per line.
 */

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { createPrefdClient, type KeyChange, type PreferencesView, type TlsOptions } from "../src/index.js";

/** What the engine enforces before sending an order. */
class RiskLimits {
  constructor(
    readonly maxPositionSizePercent: number,
    readonly maxDailyLossPercent: number,
    readonly maxDrawdownPercent: number,
    readonly stopLossPercent: number,
    readonly maxDailyTrades: number,
    readonly autoExecuteSignals: boolean,
  ) {}

  static fromView(view: PreferencesView): RiskLimits {
    return new RiskLimits(
      view.getNumber("risk_management.max_position_size_percent"),
      view.getNumber("risk_management.max_daily_loss_percent"),
      view.getNumber("risk_management.max_drawdown_percent"),
      view.getNumber("risk_management.stop_loss_percent"),
      view.getInt("trading.max_daily_trades"),
      view.getBool("trading.auto_execute_signals"),
    );
  }

  allows(positionPercent: number, tradesToday: number): boolean {
    return positionPercent <= this.maxPositionSizePercent && tradesToday < this.maxDailyTrades;
  }

  toJSON(): Record<string, number | boolean> {
    return {
      max_position_size_percent: this.maxPositionSizePercent,
      max_daily_loss_percent: this.maxDailyLossPercent,
      max_drawdown_percent: this.maxDrawdownPercent,
      stop_loss_percent: this.stopLossPercent,
      max_daily_trades: this.maxDailyTrades,
      auto_execute_signals: this.autoExecuteSignals,
    };
  }
}

function emit(event: string, fields: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify({ event, ...fields }, (_, v: unknown) => (typeof v === "bigint" ? Number(v) : v))}\n`);
}

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "localhost:50051" },
    token: { type: "string", default: process.env.PREFD_TOKEN ?? "" },
    tls: { type: "boolean", default: false },
    "ca-file": { type: "string" },
    "cert-file": { type: "string" },
    "key-file": { type: "string" },
    "server-name": { type: "string" },
    user: { type: "string" },
    org: { type: "string", default: "" },
    changes: { type: "string", default: "0" },
  },
});

/** TLS to the server when any TLS option is given, else plaintext. */
function tlsOf(): TlsOptions | undefined {
  if (!(args.tls || args["ca-file"] || args["cert-file"] || args["key-file"] || args["server-name"])) {
    return undefined;
  }
  const read = (path: string | undefined): Buffer | undefined => (path === undefined ? undefined : readFileSync(path));
  return {
    ca: read(args["ca-file"]),
    cert: read(args["cert-file"]),
    key: read(args["key-file"]),
    serverName: args["server-name"],
  };
}

async function main(): Promise<void> {
  if (!args.user) {
    throw new Error("--user is required");
  }
  const changesToSee = Number(args.changes);
  if (!Number.isInteger(changesToSee) || changesToSee < 0) {
    throw new Error("--changes must be a whole number (0: run forever)");
  }
  const tls = tlsOf();
  const client = createPrefdClient({
    target: args.target ?? "localhost:50051",
    ...(args.token ? { token: args.token } : {}),
    ...(tls !== undefined && { tls }),
  });
  try {
    const view = await client.preferencesView(args.user, args.org ?? "", {
      keyPrefixes: ["risk_management.", "trading."],
    });
    let limits = RiskLimits.fromView(view);
    let seen = 0;
    let done: () => void = () => undefined;
    const finished = new Promise<void>((resolve) => (done = resolve));
    view.onChange((changes: KeyChange[]) => {
      limits = RiskLimits.fromView(view); // in force from the next order check on
      emit("risk_limits_updated", {
        changed: Object.fromEntries(changes.map((change) => [change.key, [change.old ?? null, change.new ?? null]])),
        limits,
        stale: view.stale,
      });
      seen += 1;
      if (changesToSee > 0 && seen >= changesToSee) {
        done();
      }
    });
    emit("ready", { user: args.user, limits, cursor: view.cursor });
    emit("order_check", { position_percent: 5.0, allowed: limits.allows(5.0, 0) });
    await finished;
  } finally {
    await client.close();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
  process.exitCode = 1;
});
