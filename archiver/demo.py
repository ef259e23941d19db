"""`archiver demo`: the whole path on one machine, with nothing to configure."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import orjson
from aiohttp import web

from archiver import logs
from archiver.ingest.server import create_app
from archiver.layout import RecordingId
from archiver.settings import Settings
from archiver.simulator import Simulation, run_simulation
from archiver.store import LocalFolderStore
from archiver.verify import check_stream


async def run_demo(participants: int, seconds: float, root: Path) -> int:
    """Serve on a free local port, stream a simulated meeting through it, verify it all."""
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
    runner = web.AppRunner(create_app(settings, store))
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
    print(f"streaming {participants} participants x webcam+screenshare, {seconds:g} s each ...")
    await run_simulation(simulation)
    await runner.cleanup()

    failures = 0
    print(f"\narchive of bot {simulation.bot_id}, recording {simulation.recording_id}:")
    recording = RecordingId(simulation.bot_id, simulation.recording_id)
    session = orjson.loads(await store.get(recording.session_key) or b"{}")
    for entry in session.get("streams", []):
        check = await check_stream(store, entry["manifest_key"])
        sizes = sorted({f"{f.width}x{f.height}" for f in check.frames})
        sent = sum(
            len(s.sent)
            for s in simulation.streams
            if str(s.participant_id) == entry["participant_id"] and s.video_type == entry["type"]
        )
        verdict = "ok" if check.ok and len(check.frames) == sent else "FAILED"
        failures += verdict != "ok"
        print(
            f"  participant {entry['participant_id']} {entry['type']}/{entry['format']}: "
            f"{len(check.manifest.get('segments', []))} segments, "
            f"{len(check.frames)}/{sent} frames decoded, sizes {', '.join(sizes)}: {verdict}"
        )
        for problem in check.problems:
            print(f"    problem: {problem}")
    print(f"\nfiles under {root / recording.prefix}:")
    for line in await asyncio.to_thread(_tree, root / recording.prefix):
        print(f"  {line}")
    return 1 if failures else 0


def _tree(folder: Path) -> list[str]:
    return [
        f"{path.relative_to(folder)}  ({path.stat().st_size} bytes)"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
