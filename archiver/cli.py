"""`archiver serve | reconcile | token | simulate | demo | verify | export`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson
import pydantic
import structlog

from archiver import logs
from archiver.errors import ConfigError, InvalidIdError, StoreError
from archiver.ingest.tokens import create_token, ingest_grant, view_grant
from archiver.service.app import create_app
from archiver.service.supervisor import Supervisor
from archiver.settings import Settings
from archiver.store import open_fallback_store, open_store
from archiver.store.reconcile import reconcile
from archiver.store.spool import probe_folder
from archiver.tools.loadgen import Load, run_load
from archiver.tools.simulator import PNG_FPS, PNG_SIZE, Simulation, run_simulation
from archiver.values import Grant

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

    token = commands.add_parser("token", help="short-lived signed tokens for bots")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser(
        "create",
        help="print a token signed with the first of ARCHIVER_TOKEN_KEYS, on one line",
    )
    create.add_argument(
        "--ttl",
        type=float,
        required=True,
        metavar="SECONDS",
        help="lifetime: until the bot's meeting has ended, plus Recall's reconnect window; "
        "at most ARCHIVER_TOKEN_MAX_TTL_S (default 86400)",
    )
    scope = create.add_mutually_exclusive_group()
    scope.add_argument(
        "--bot",
        metavar="BOT_ID",
        help="the one bot it writes for (default: the first bot that connects with it)",
    )
    scope.add_argument(
        "--view",
        metavar="BOT_ID/RECORDING_ID",
        help="a viewer token: opens that recording's viewer pages and objects, nothing else",
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
    pace = simulate.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        dest="fast",
        action="store_false",
        default=False,
        help="send each frame at its time (the default)",
    )
    pace.add_argument("--fast", action="store_true", help="as fast as the service reads")
    simulate.add_argument(
        "--bots",
        type=int,
        default=None,
        help="load generator: this many bots at once, each with --participants webcams, "
        "replaying one clip encoded before the clock starts; prints a JSON report",
    )

    verify = commands.add_parser(
        "verify", help="check a recording's objects against its manifests (exit 0: intact)"
    )
    _archive_arguments(verify, required=False)
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument(
        "--decode",
        action="store_true",
        help="decode every H.264 stream too (run by run): every listed frame must decode",
    )

    export = commands.add_parser(
        "export", help="export a recording to MP4, WAV, PNG and JSON Lines"
    )
    _archive_arguments(export, required=True)
    export.add_argument("--output", required=True, type=Path, help="folder to write into")
    export.add_argument("--participant", help="only this participant's streams")
    export.add_argument(
        "--type",
        choices=["webcam", "screenshare", "audio"],
        help="only this type (webcam MP4s carry their participant's audio either way)",
    )
    export.add_argument(
        "--reencode",
        type=_size,
        metavar="WIDTHxHEIGHT",
        help="one re-encoded MP4 per stream at this size, across resolution changes",
    )

    demo = commands.add_parser("demo", help="serve locally, simulate a meeting, show the archive")
    demo.add_argument("--participants", type=int, default=3)
    demo.add_argument(
        "--png-participants", type=int, default=2, help="more participants, streaming PNG"
    )
    demo.add_argument("--seconds", type=float, default=12.0)
    demo.add_argument("--folder", default="./archive", help="where the archive is written")
    return parser


def _archive_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("store_url", metavar="STORE_URL", help="s3://bucket/prefix or file:///path")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. MinIO")
    scope = "" if required else " (default: every recording in the store)"
    parser.add_argument("--bot", required=required, help=f"bot id{scope}")
    parser.add_argument("--recording", required=required, help=f"recording id{scope}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve()
        if args.command == "reconcile":
            return asyncio.run(reconcile_once())
        if args.command == "token":
            return print_token(args.ttl, _grant(args.bot, args.view))
        if args.command == "simulate":
            return simulate(args)
        if args.command == "verify":
            return asyncio.run(verify(args))
        if args.command == "export":
            return asyncio.run(export(args))
        from archiver.tools.demo import run_demo

        return asyncio.run(
            run_demo(
                args.participants,
                args.seconds,
                Path(args.folder).resolve(),
                png_participants=args.png_participants,
            )
        )
    except (ConfigError, StoreError) as exc:
        # A bad argument, or a store that could not be read: nothing was checked.
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


def _grant(bot_id: str | None, view: str | None) -> Grant:
    try:
        if view is not None:
            bot, _, recording = view.partition("/")
            return view_grant(bot, recording)
        return ingest_grant(bot_id)
    except InvalidIdError as exc:
        raise ConfigError(f"not a bot or recording id: {exc.detail}") from None


def print_token(ttl_s: float, grant: Grant) -> int:
    settings = _settings()
    if not settings.token_keys:
        raise ConfigError("no signing key configured: set ARCHIVER_TOKEN_KEYS")
    key = settings.token_keys[0].get_secret_value()
    print(create_token(key, ttl_s, grant=grant, max_ttl_s=settings.token_max_ttl_s))
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
    if args.bots is not None:
        return generate_load(args)
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


def generate_load(args: argparse.Namespace) -> int:
    if args.format != "h264" or args.screenshare or args.resize_at is not None:
        raise ConfigError("--bots sends H.264 webcams only, at one size")
    if args.bots < 1 or args.participants < 1:
        raise ConfigError("--bots and --participants must be at least 1")
    load = Load(
        url=args.url,
        bots=args.bots,
        participants=args.participants,
        seconds=args.seconds,
        fps=args.fps or 15.0,
        size=args.size or (320, 240),
        realtime=not args.fast,
    )
    report = asyncio.run(run_load(load))
    sys.stdout.write(orjson.dumps(report.summary(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if report.frames == report.expected_frames else 1


async def verify(args: argparse.Namespace) -> int:
    from archiver.consumers.reader import Archive
    from archiver.consumers.verify import verify as verify_archive

    if args.recording is not None and args.bot is None:
        raise ConfigError("--recording needs --bot")
    async with Archive.open(args.store_url, args.s3_endpoint_url) as archive:
        report = await verify_archive(archive, args.bot, args.recording, decode=args.decode)
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


async def export(args: argparse.Namespace) -> int:
    from archiver.consumers.export import export_recording
    from archiver.consumers.reader import Archive
    from archiver.layout import RecordingId

    async with Archive.open(args.store_url, args.s3_endpoint_url) as archive:
        result = await export_recording(
            archive,
            RecordingId(args.bot, args.recording),
            args.output,
            participant_id=args.participant,
            video_type=args.type,
            reencode=args.reencode,
        )
    for problem in result.problems:
        print(f"archiver: {problem}", file=sys.stderr)
    if not result.files:
        print("archiver: nothing to export", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
