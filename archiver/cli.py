"""`archiver serve | simulate | demo`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import pydantic
import structlog

from archiver import logs
from archiver.errors import ConfigError
from archiver.ingest.server import create_app
from archiver.settings import Settings
from archiver.simulator import PNG_FPS, PNG_SIZE, Simulation, run_simulation
from archiver.supervisor import Supervisor

log = structlog.get_logger(__name__)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service (settings from ARCHIVER_* variables)")

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


def serve() -> int:
    try:
        settings = Settings()
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid settings:\n{exc}") from exc
    logs.configure(settings.log_level, settings.log_format)
    create_app(settings)  # Refuse bad settings here, before any worker starts.
    Supervisor(settings).run()
    return 0


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
