"""The client examples run as the README says, against a real server, and do what they claim."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import asyncpg

from prefd_server.app import App
from tests.helpers.auth import auth, token, unique
from tests.helpers.processes import ROOT
from tests.helpers.requests import set_request, user

ADMIN = auth("admin")
EXAMPLES = ROOT / "clients" / "python" / "examples"


async def _start(app: App, script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        "--target",
        f"127.0.0.1:{app.port}",
        "--token",
        token("admin", "example-operator"),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _events(process: asyncio.subprocess.Process, count: int) -> list[dict[str, Any]]:
    assert process.stdout is not None
    events = []
    async with asyncio.timeout(30):
        while len(events) < count:
            line = await process.stdout.readline()
            assert line, (await process.stderr.read()).decode() if process.stderr else "no output"
            events.append(json.loads(line))
    return events


async def test_the_trading_engine_applies_new_risk_limits_on_change(app: App, stub) -> None:
    uid = unique("trader")
    process = await _start(app, "trading_engine.py", "--user", uid, "--changes", "1")
    ready, check = await _events(process, 2)
    assert ready["event"] == "ready" and check["event"] == "order_check"
    assert ready["limits"]["max_daily_loss_percent"] != 1.5
    await stub.SetPreferences(set_request(user(uid), {"risk_management.max_daily_loss_percent": 1.5}), metadata=ADMIN)
    [update] = await _events(process, 1)
    assert update["event"] == "risk_limits_updated"
    assert update["changed"]["risk_management.max_daily_loss_percent"][1] == 1.5
    assert update["limits"]["max_daily_loss_percent"] == 1.5
    assert await process.wait() == 0


async def test_the_generation_worker_reads_model_settings_and_records_usage(app: App, db: asyncpg.Connection) -> None:
    uid = unique("writer")
    process = await _start(app, "generation_worker.py", "--user", uid, "--jobs", "3")
    ready, *jobs = await _events(process, 4)
    assert await process.wait() == 0
    assert ready["model"] and all(job["event"] == "job_done" and job["recorded"] for job in jobs)
    assert {job["model"] for job in jobs} == {ready["model"]}
    assert await db.fetchval("SELECT count(*) FROM ai_usage WHERE user_id = $1", uid) == 3


async def test_the_notification_worker_acts_on_prefd_decisions(app: App, stub) -> None:
    uid = unique("reader")
    switches = {"notifications.email.enabled": False, "notifications.push.enabled": True}
    await stub.SetPreferences(set_request(user(uid), switches), metadata=ADMIN)
    process = await _start(app, "notification_worker.py", "--user", uid, "--events", "3")
    ready, loss, generation, outage = await _events(process, 4)
    assert await process.wait() == 0
    assert ready["event"] == "ready"
    assert all(e["event"] == "decided" for e in (loss, generation, outage))
    # LARGE_LOSS's shipped rule names EMAIL, SMS and PUSH: push is on, email and SMS off; the rest not named.
    assert loss["send"] == ["push"]
    assert {"email:CHANNEL_DISABLED", "sms:CHANNEL_DISABLED", "in_app:EVENT_DISABLED"} <= set(loss["suppressed"])
    assert "push" in generation["send"] and "in_app" in generation["send"]
    assert "push" in outage["send"] and "email:CHANNEL_DISABLED" in outage["suppressed"]
