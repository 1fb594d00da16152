"""A notification worker that asks prefd whether, where and when to send each event, and acts on the answer.

    PREFD_TOKEN=... python clients/python/examples/notification_worker.py --user alice --events 3

Uses the blocking PrefdClient (as a threaded worker would). Each event goes through Decide with
`consume` set, so throttles are charged once per event (the idempotency key makes a retried event
charge nothing more); the worker sends on SEND_NOW channels, queues DEFER and DIGEST ones for
`deliver_after`, and logs why the others were suppressed.
"""

from __future__ import annotations

import argparse
import json
import os

from google.protobuf import json_format

from prefd.client import PrefdClient
from prefd.client.channel import TLSConfig
from prefd.v1 import common_pb2, notifications_pb2

N = notifications_pb2
# What the worker emits per (event type, category, priority, data).
EVENTS = (
    ("LARGE_LOSS", "trading", N.PRIORITY_HIGH, {"loss_amount": 2500, "symbol": "AAPL"}),
    ("generation_complete", "generation_complete", N.PRIORITY_LOW, {"job": "report-42"}),
    ("SYSTEM_DOWN", "system_alerts", N.PRIORITY_CRITICAL, {"component": "ingest"}),
)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def tls_of(args: argparse.Namespace) -> TLSConfig | None:
    """TLS to the server when any TLS option is given, else plaintext."""
    if not (args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name):
        return None
    return TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file, args.server_name)


def handle(client: PrefdClient, args: argparse.Namespace, n: int) -> None:
    """Decide one event for the user and act on every channel's answer."""
    event_type, category, priority, data = EVENTS[n % len(EVENTS)]
    request = N.DecideRequest(
        subject=common_pb2.Subject(user_id=args.user, org_id=args.org),
        event=N.Event(event_type=event_type, category=category, priority=priority),
        consume=True,
        idempotency_key=f"{args.user}:{event_type}:{n}",
    )
    request.event.data.update(data)
    decision = client.decide(request).decision
    plan: dict[str, list[str]] = {"send": [], "later": [], "suppressed": []}
    for answer in decision.channels:
        channel = N.Channel.Name(answer.channel).removeprefix("CHANNEL_").lower()
        action = N.Action.Name(answer.action).removeprefix("ACTION_")
        reason = N.Reason.Name(answer.reason).removeprefix("REASON_")
        if action == "SEND_NOW":
            plan["send"].append(channel)
        elif action in ("DEFER", "DIGEST"):
            when = json_format.MessageToJson(answer.deliver_after).strip('"')
            plan["later"].append(f"{channel}@{when}")
        else:
            plan["suppressed"].append(f"{channel}:{reason}")
    emit("decided", event_type=event_type, category=category, **plan)


def main(args: argparse.Namespace) -> None:
    with PrefdClient(args.target, token=args.token, tls=tls_of(args)) as client:
        emit("ready", user=args.user)
        for n in range(args.events):
            handle(client, args, n)


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
