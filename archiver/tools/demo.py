"""`archiver demo`: the whole path on one machine, with nothing to configure."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from archiver import logs
from archiver.consumers.decode_check import Check, check_events, check_png_stream, check_stream
from archiver.layout import RecordingId
from archiver.service.app import create_app
from archiver.service.shutdown import DrainingAppRunner
from archiver.settings import Settings
from archiver.store import LocalFolderStore
from archiver.tools.simulator import PNG_FPS, PNG_SIZE, Simulation, run_simulation


async def run_demo(participants: int, seconds: float, root: Path, png_participants: int = 2) -> int:
    """Serve on a free local port, stream a simulated meeting through it (H.264 and PNG
    participants, on two connections as two realtime endpoints would), verify it all."""
    logs.configure(level="warning")
    token = secrets.token_urlsafe(24)
    settings = Settings(
        auth_tokens=(token,),
        store=f"file://{root}",
        spool_dir=str(root.parent / f".{root.name}-spool"),
        segment_target_s=4.0,
        _env_file=None,
    )
    store = LocalFolderStore(root)
    runner = DrainingAppRunner(create_app(settings, store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"archiver listening on 127.0.0.1:{port}, archive in {root}")
    simulation = Simulation(
        url=f"ws://127.0.0.1:{port}/ws?token={token}",
        participants=participants,
        seconds=seconds,
        screenshare=True,
        resize_at_s=seconds / 2,
        realtime=False,
    )
    png_simulation = Simulation(
        url=simulation.url,
        participants=png_participants,
        seconds=seconds,
        fps=PNG_FPS,
        size=PNG_SIZE,
        format="png",
        first_participant_id=100 + participants,
        bot_id=simulation.bot_id,
        recording_id=simulation.recording_id,
    )
    print(
        f"streaming {participants} participants x webcam+screenshare (H.264) and "
        f"{png_participants} x webcam (PNG), {seconds:g} s each ..."
    )
    await asyncio.gather(run_simulation(simulation), run_simulation(png_simulation))
    await runner.cleanup()

    failures = 0
    print(f"\narchive of bot {simulation.bot_id}, recording {simulation.recording_id}:")
    recording = RecordingId(simulation.bot_id, simulation.recording_id)
    session = orjson.loads(await store.get(recording.session_key) or b"{}")
    simulated = [*simulation.streams, *png_simulation.streams]
    for entry in session.get("streams", []):
        sent = sum(
            len(s.sent)
            for s in simulated
            if str(s.participant_id) == entry["participant_id"]
            and s.video_type == entry["type"]
            and s.media_format == entry["format"]
        )
        failures += await _report_stream(store, entry, sent)
    failures += await _report_events(store, recording)
    print(f"\nfiles under {root / recording.prefix}:")
    for line in await asyncio.to_thread(_tree, root / recording.prefix):
        print(f"  {line}")
    return 1 if failures else 0


async def _report_stream(store: LocalFolderStore, entry: dict[str, Any], sent: int) -> int:
    """Print one stream's verdict; 1 when it failed. A stream is ok when the simulator's
    sent frames, the service's received and archived counts and the frames read back all
    agree; when they do not, every figure is printed, so a regression says where the frames
    went (never sent, never read by the service, dropped, or unreadable)."""
    if entry["format"] == "png":
        check: Check[Any] = await check_png_stream(store, entry["manifest_key"])
        parts = f"{len(check.manifest.get('batches', []))} tar batches"
        read_back = "frames at their listed offsets"
    else:
        check = await check_stream(store, entry["manifest_key"])
        parts = f"{len(check.manifest.get('segments', []))} segments"
        read_back = "frames decoded"
    counters = check.manifest.get("counters", {})
    received, archived = counters.get("received", 0), counters.get("archived", 0)
    agree = len(check.frames) == sent == received == archived
    verdict = "ok" if check.ok and agree else "FAILED"
    sizes = sorted({f"{f.width}x{f.height}" for f in check.frames})
    print(
        f"  participant {entry['participant_id']} {entry['type']}/{entry['format']}: "
        f"{parts}, {len(check.frames)}/{sent} {read_back}, sizes {', '.join(sizes)}: {verdict}"
    )
    if not agree:
        dropped = {k: v for k, v in counters.items() if k.startswith("dropped_") and v}
        print(
            f"    sent by the simulator {sent}, received by the service {received}, "
            f"archived {archived}, read back {len(check.frames)}, "
            f"dropped {dropped or 'none'}"
        )
    for problem in check.problems:
        print(f"    problem: {problem}")
    return verdict != "ok"


async def _report_events(store: LocalFolderStore, recording: RecordingId) -> int:
    """Print the recording's events archive; 1 when it failed."""
    check = await check_events(store, recording)
    kinds = ", ".join(f"{n} {e}" for e, n in sorted(check.manifest.get("event_types", {}).items()))
    verdict = "ok" if check.ok and check.events else "FAILED"
    print(
        f"  events: {len(check.manifest.get('batches', []))} batches, "
        f"{len(check.events)} events ({kinds}): {verdict}"
    )
    for problem in check.problems:
        print(f"    problem: {problem}")
    return verdict != "ok"


def _tree(folder: Path) -> list[str]:
    return [
        f"{path.relative_to(folder)}  ({path.stat().st_size} bytes)"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
