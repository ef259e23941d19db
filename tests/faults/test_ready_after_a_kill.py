"""A worker killed while a recording waits out its grace: its replacement, on the same
spool slot, waits it out again and sends the notice."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson

from tests.faults.conftest import ServiceProcesses
from tests.pipeline.test_recording_ready import SECRET, Meeting, Receiver, receiver

__all__ = ["receiver"]


async def test_a_recording_in_its_grace_completes_after_its_worker_is_killed(
    services: ServiceProcesses, receiver: Receiver
) -> None:
    service = await services.start(
        recording_ready_grace_s=3,
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        webhook_backoff_s=0.05,
    )
    (pid,) = await service.wait_for_workers(1)
    meeting = Meeting()
    await meeting.connect_and_send(service)
    waiting = service.slot(0) / "waiting"
    async with asyncio.timeout(30):
        while not any(waiting.glob("*.json")):  # noqa: ASYNC110 (a folder)
            await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    await service.wait_for_workers(1)

    await receiver.wait_for(1, timeout_s=60)
    (notice,) = receiver.accepted
    assert notice["recording_id"] == meeting.plan.recording_id
    raw = await services.store.get(meeting.recording.session_key)
    assert raw is not None
    assert orjson.loads(raw)["complete"] is True
    assert not any(waiting.glob("*.json"))
