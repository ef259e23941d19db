"""`archiver serve | reconcile | simulate | demo`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson
import pydantic
import structlog

from archiver import logs
from archiver.errors import ConfigError, StoreError
from archiver.ingest.server import create_app
from archiver.reconcile import reconcile
from archiver.settings import Settings
from archiver.simulator import PNG_FPS, PNG_SIZE, Simulation, run_simulation
from archiver.store import open_fallback_store, open_store
from archiver.store.spool import probe_folder
from archiver.supervisor import Supervisor

log = structlog.get_logger(__name__)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service (settings from ARCHIVER_* variables)")
    commands.add_parser(
        "reconcile",
        help="move what the fallback store holds into the primary store, and report it",
    )

    simulate = commands.add_parser("simulate", help="stream a simulated meeting, like a bot")
    simulate.add_argument("--url", required=True, help="ws://host:port/ws?token=...")
    simulate.add_argument("--participants", type=int, default=2)
    simulate.add_argument("--seconds", type=float, default=20.0)
    simulate.add_argument(
        "--format", choices=["h264", "png"], default="h264", help="video_separate_h264 or _png"
    )
    simulate.add_argument("--fps", type=float, default=None, help="default: 15 (H.264), 2 (PNG)")
    simulate.add_argument(
        "--size",
        type=_size,
        default=None,
        help="WIDTHxHEIGHT; default: 320x240 (H.264), 640x360 (PNG)",
    )
    simulate.add_argument("--screenshare", action="store_true", help="add a screenshare each")
    simulate.add_argument("--resize-at", type=float, default=None, help="seconds; new size then")
    simulate.add_argument("--resize-to", type=_size, default=(480, 272), help="WIDTHxHEIGHT")
    simulate.add_argument("--keyframe-interval", type=float, default=None, help="seconds")
    simulate.add_argument("--fast", action="store_true", help="as fast as possible")

    demo = commands.add_parser("demo", help="serve locally, simulate a meeting, show the archive")
    demo.add_argument("--participants", type=int, default=3)
    demo.add_argument(
        "--png-participants", type=int, default=2, help="more participants, streaming PNG"
    )
    demo.add_argument("--seconds", type=float, default=12.0)
    demo.add_argument("--folder", default="./archive", help="where the archive is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve()
        if args.command == "reconcile":
            return asyncio.run(reconcile_once())
        if args.command == "simulate":
            return simulate(args)
        from archiver.demo import run_demo

        return asyncio.run(
            run_demo(
                args.participants,
                args.seconds,
                Path(args.folder).resolve(),
                png_participants=args.png_participants,
            )
        )
    except ConfigError as exc:
        print(f"archiver: {exc}", file=sys.stderr)
        return 2


def _settings() -> Settings:
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid settings:\n{exc}") from exc


def serve() -> int:
    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    create_app(settings)  # Refuse bad settings here, before any worker starts.
    # A spool that cannot be written would lose every frame while looking ready.
    probe_folder(settings.spool_dir)
    Supervisor(settings).run()
    return 0


async def reconcile_once() -> int:
    """One pass of what a running service does in the background; 0 when the fallback is
    left empty, 1 when something stayed there (logged)."""
    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    fallback = open_fallback_store(settings)
    if fallback is None:
        raise ConfigError("no fallback store configured: set ARCHIVER_FALLBACK_STORE")
    primary = open_store(settings)
    try:
        report = await reconcile(primary, fallback)
    except StoreError as exc:
        print(f"archiver: {exc}", file=sys.stderr)
        return 1
    finally:
        await primary.close()
        await fallback.close()
    print(
        orjson.dumps(
            {
                "moved_objects": report.moved_objects,
                "moved_bytes": report.moved_bytes,
                "merged_documents": report.merged_documents,
                "left": report.left,
                "seconds": report.seconds,
            }
        ).decode()
    )
    return 1 if report.left else 0


def simulate(args: argparse.Namespace) -> int:
    logs.configure()
    png = args.format == "png"
    simulation = Simulation(
        url=args.url,
        participants=args.participants,
        seconds=args.seconds,
        fps=args.fps or (PNG_FPS if png else 15.0),
        size=args.size or (PNG_SIZE if png else (320, 240)),
        format=args.format,
        screenshare=args.screenshare,
        resize_at_s=args.resize_at,
        resize_to=args.resize_to,
        keyframe_interval_s=args.keyframe_interval,
        realtime=not args.fast,
    )
    asyncio.run(run_simulation(simulation))
    log.info(
        "simulation_sent",
        bot=simulation.bot_id,
        recording=simulation.recording_id,
        frames=sum(len(s.sent) for s in simulation.streams),
        streams=len(simulation.streams),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
