"""A notification worker that routes each event by the user's channel switches, read from memory.

    PREFD_TOKEN=... python clients/python/examples/notification_worker.py --user alice --events 3

Uses the blocking PrefdClient (as a threaded worker would): the view stays live on the client's
thread while the worker loop reads it without I/O.
"""

from __future__ import annotations

import argparse
import json
import os

from prefd.client import PrefdClient, PreferencesView
from prefd.client.channel import TLSConfig

CHANNELS = ("email", "push", "in_app", "sms", "webhook")


def route(view: PreferencesView, category: str) -> list[str]:
    """The channels an event of `category` goes to under the user's current switches."""
    if not view.get_bool(f"notifications.categories.{category}", True):
        return []
    return [channel for channel in CHANNELS if view.get_bool(f"notifications.{channel}.enabled")]


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def tls_of(args: argparse.Namespace) -> TLSConfig | None:
    """TLS to the server when any TLS option is given, else plaintext."""
    if not (args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name):
        return None
    return TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file, args.server_name)


def main(args: argparse.Namespace) -> None:
    with PrefdClient(args.target, token=args.token, tls=tls_of(args)) as client:
        view = client.preferences(args.user, args.org, key_prefixes=["notifications."])
        view.on_change(lambda changes: emit("switches_changed", keys=[c.key for c in changes]))
        emit("ready", user=args.user, frequency=view.get_str("notifications.frequency"))
        for n in range(args.events):
            category = ("generation_complete", "errors", "system_alerts")[n % 3]
            emit("routed", category=category, channels=route(view, category))


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
    parser.add_argument("--events", type=int, default=3)
    main(parser.parse_args())
