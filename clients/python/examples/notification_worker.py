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

CHANNELS = ("email", "push", "in_app", "sms", "webhook")


def route(view: PreferencesView, category: str) -> list[str]:
    """The channels an event of `category` goes to under the user's current switches."""
    if not view.get_bool(f"notifications.categories.{category}", True):
        return []
    return [channel for channel in CHANNELS if view.get_bool(f"notifications.{channel}.enabled")]


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(args: argparse.Namespace) -> None:
    with PrefdClient(args.target, token=args.token) as client:
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
    parser.add_argument("--user", required=True)
    parser.add_argument("--org", default="")
    parser.add_argument("--events", type=int, default=3)
    main(parser.parse_args())
