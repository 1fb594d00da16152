"""A generation worker that reads its model settings from prefd and records what each job cost.

    PREFD_TOKEN=<service or admin token> python clients/python/examples/generation_worker.py --user alice --jobs 3

The effective AI configuration (defaults <- env <- global <- org <- user) comes from a live view,
so every job uses the settings in force when it starts; budget threshold crossings arrive on the
same stream. Usage is recorded once per job (the request id makes a retry harmless).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

from prefd.client import AsyncPrefdClient, PrefdError
from prefd.client.channel import TLSConfig
from prefd.v1 import ai_config_pb2, common_pb2


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def tls_of(args: argparse.Namespace) -> TLSConfig | None:
    """TLS to the server when any TLS option is given, else plaintext."""
    if not (args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name):
        return None
    return TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file, args.server_name)


async def main(args: argparse.Namespace) -> None:
    async with AsyncPrefdClient(args.target, token=args.token, tls=tls_of(args)) as client:
        view = await client.ai_config(args.user, args.org)
        view.on_budget(
            lambda crossed: emit("budget_threshold_crossed", threshold=crossed.threshold, spent_usd=crossed.spent_usd)
        )
        emit("ready", user=args.user, model=view.configuration.model.model)
        for job in range(args.jobs):
            settings = view.configuration.model  # from memory
            prompt_tokens, output_tokens = 400 + 50 * job, min(300, settings.max_tokens or 300)
            request = ai_config_pb2.RecordUsageRequest(
                subject=common_pb2.Subject(user_id=args.user, org_id=args.org),
                model=settings.model,
                input_tokens=prompt_tokens,
                output_tokens=output_tokens,
                request_id=f"job-{uuid.uuid4()}",
            )
            try:
                reply = await client.record_usage(request)
            except PrefdError as error:
                emit("usage_refused", code=error.code.name, reason=error.reason)
                continue
            emit(
                "job_done",
                job=job,
                model=settings.model,
                temperature=round(settings.temperature, 3),
                cost_nanos=reply.cost_nanos,
                recorded=reply.recorded,
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
    parser.add_argument("--jobs", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
