"""A trading engine that keeps a user's risk limits in memory and applies new ones the moment they change.

    PREFD_TOKEN=... python clients/python/examples/trading_engine.py --user alice --org acme

Every order check reads the limits from the live view (no network round trip); `on_change`
swaps in new limits as soon as prefd commits them. Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import asdict, dataclass

from prefd.client import AsyncPrefdClient, KeyChange, PreferencesView
from prefd.client.channel import TLSConfig


@dataclass(frozen=True)
class RiskLimits:
    """What the engine enforces before sending an order."""

    max_position_size_percent: float
    max_daily_loss_percent: float
    max_drawdown_percent: float
    stop_loss_percent: float
    max_daily_trades: int
    auto_execute_signals: bool

    @classmethod
    def from_view(cls, view: PreferencesView) -> RiskLimits:
        return cls(
            max_position_size_percent=view.get_float("risk_management.max_position_size_percent"),
            max_daily_loss_percent=view.get_float("risk_management.max_daily_loss_percent"),
            max_drawdown_percent=view.get_float("risk_management.max_drawdown_percent"),
            stop_loss_percent=view.get_float("risk_management.stop_loss_percent"),
            max_daily_trades=view.get_int("trading.max_daily_trades"),
            auto_execute_signals=view.get_bool("trading.auto_execute_signals"),
        )

    def allows(self, position_percent: float, trades_today: int) -> bool:
        return position_percent <= self.max_position_size_percent and trades_today < self.max_daily_trades


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def tls_of(args: argparse.Namespace) -> TLSConfig | None:
    """TLS to the server when any TLS option is given, else plaintext."""
    if not (args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name):
        return None
    return TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file, args.server_name)


async def main(args: argparse.Namespace) -> None:
    async with AsyncPrefdClient(args.target, token=args.token, tls=tls_of(args)) as client:
        view = await client.preferences(args.user, args.org, key_prefixes=["risk_management.", "trading."])
        limits = RiskLimits.from_view(view)
        updates = asyncio.Queue[list[KeyChange]]()

        def apply(changes: list[KeyChange]) -> None:
            nonlocal limits
            limits = RiskLimits.from_view(view)  # in force from the next order check on
            updates.put_nowait(changes)

        view.on_change(apply)
        emit("ready", user=args.user, limits=asdict(limits), cursor=view.cursor)
        emit("order_check", position_percent=5.0, allowed=limits.allows(5.0, trades_today=0))
        for _ in range(args.changes) if args.changes else iter(int, 1):
            changes = await updates.get()
            emit(
                "risk_limits_updated",
                changed={c.key: [c.old, c.new] for c in changes},
                limits=asdict(limits),
                stale=view.stale,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--token", default=os.environ.get("PREFD_TOKEN", ""))
    parser.add_argument("--tls", action="store_true", help="the server speaks TLS (implied by the options below)")
    parser.add_argument("--ca-file", help="PEM CA certificates to trust (default: the system's roots)")
    parser.add_argument("--cert-file", help="PEM client certificate, when the server requires one (mTLS)")
    parser.add_argument("--key-file", help="the client certificate's PEM private key")
    parser.add_argument("--server-name", help="the name the server's certificate carries, if not the target's host")
    parser.add_argument("--user", required=True)
    parser.add_argument("--org", default="")
    parser.add_argument("--changes", type=int, default=0, help="exit after this many updates (0: run forever)")
    asyncio.run(main(parser.parse_args()))
