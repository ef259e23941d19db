"""The synchronized viewer: a page that plays every stream of a recording in one grid, on
one wall-clock timeline, served by the service when `ARCHIVER_VIEWER=true`.

The service answers, behind the bots' tokens (`?token=`):

- `/recordings/{bot}/{recording}`: the page (static HTML and JS, hls.js beside it);
- `.../streams.json`: each stream with its wall-clock range, for H.264 and audio the URL
  of its playlist and its segments' wall-clock starts and durations, for PNG every frame's time,
  batch URL and byte range;
- `.../playlists/{participant}/{type}.m3u8`: the stream's HLS playlist, rendered from its
  manifest, with every segment and init URI rewritten to a URL the browser can fetch: a
  presigned S3 URL, or for a local folder store the service's own `.../objects/{key}`.

The token travels in query strings only (a bot cannot send headers, and media elements
cannot either); the access log leaves query strings out, and the page sends no `Referer`.
This module reads the store and the documents; it never imports the write side.
"""

from __future__ import annotations

import asyncio
import math
import posixpath
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from archiver.consumers.reader import Archive, StreamInfo, parse_stream_key
from archiver.documents.playlists import CONTENT_TYPE as PLAYLIST_CONTENT_TYPE
from archiver.documents.playlists import render_playlist
from archiver.errors import ConfigError, DamagedObjectError, InvalidIdError, StoreError
from archiver.layout import AUDIO_FORMATS, MANIFEST_NAME, RecordingId, safe_id
from archiver.store import ReadableStore, S3Store, store_from_url
from archiver.values import Grant

PAGE_DIR = Path(__file__).with_name("viewer_page")
HLS_JS_URL = "/viewer/hls.min.js"
_SOURCE_HLS_JS = Path(__file__).resolve().parents[2] / "viewer/node_modules/hls.js/dist/hls.min.js"
_PNG_LAST_FRAME_S = 0.5
"""How long a PNG stream's last frame stays up when there is no frame after it to say
(Recall sends 2 fps)."""
_CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".m4s": "video/iso.segment",
    ".m3u8": PLAYLIST_CONTENT_TYPE,
    ".tar": "application/x-tar",
    ".json": "application/json",
}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; worker-src 'self' blob:; "
        "connect-src 'self' http: https:; media-src 'self' blob:; img-src 'self' blob: data:; "
        "style-src 'self'; frame-ancestors 'none'"
    ),
}


def find_hls_js(configured: str | None) -> Path:
    """The hls.js file to serve: the configured one, else a source checkout's
    `viewer/node_modules` (`npm ci --prefix viewer`); ConfigError when there is none."""
    path = Path(configured) if configured else _SOURCE_HLS_JS
    if not path.is_file():
        raise ConfigError(
            f"the viewer needs hls.js and {path} is not a file: run `npm ci --prefix viewer` "
            "in the source checkout, or set ARCHIVER_VIEWER_HLS_JS_PATH"
        )
    return path


def wall_ms(iso: str) -> float:
    """An ISO 8601 wall-clock time as milliseconds since the epoch."""
    return datetime.fromisoformat(iso).timestamp() * 1000.0


def rewrite_playlist(text: str, folder: str, link: Callable[[str], str]) -> str:
    """`text` with every URI (segments, and `#EXT-X-MAP` init segments), relative to the
    store folder `folder`, replaced by `link(key)` of the key it names."""

    def resolve(uri: str) -> str:
        return link(posixpath.normpath(posixpath.join(folder, uri)))

    lines = []
    for line in text.splitlines():
        if line.startswith('#EXT-X-MAP:URI="'):
            uri = line.removeprefix('#EXT-X-MAP:URI="').rpartition('"')[0]
            line = f'#EXT-X-MAP:URI="{resolve(uri)}"'
        elif line and not line.startswith("#"):
            line = resolve(line)
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Links:
    """URLs the browser fetches media by: presigned S3 URLs, or the service's own
    `objects/` route for a store it cannot presign (a local folder)."""

    store: ReadableStore
    recording: RecordingId
    token: str
    expiry_s: int

    @property
    def base(self) -> str:
        return f"/recordings/{self.recording.bot_id}/{self.recording.recording_id}"

    @property
    def query(self) -> str:
        return f"?token={quote(self.token, safe='')}" if self.token else ""

    def object(self, key: str) -> str:
        """The URL of the store key `key` (relative to the store's prefix)."""
        if isinstance(self.store, S3Store):
            return self.store.presigned_get_url(key, self.expiry_s)
        inside = key.removeprefix(self.recording.prefix + "/")
        return f"{self.base}/objects/{quote(inside)}{self.query}"

    def playlist(self, stream: StreamInfo) -> str:
        return f"{self.base}/playlists/{stream.participant_id}/{stream.type}.m3u8{self.query}"


def _participant_name(session: dict[str, Any] | None, manifest: dict[str, Any], pid: str) -> str:
    participant = manifest.get("participant") or {}
    if participant.get("name"):
        return str(participant["name"])
    for entry in (session or {}).get("participants", []):
        if str(entry.get("id")) == pid and entry.get("name"):
            return str(entry["name"])
    return f"Participant {pid}"


def describe_timed(archive: Archive, manifest: dict[str, Any], links: Links) -> dict[str, Any]:
    """An H.264 or audio stream's timing for the page: each segment's wall-clock start and
    duration, in playlist order (the page adds the durations up into playlist positions)."""
    segments = [
        {"wall_ms": wall_ms(s["start_wallclock"]), "duration": s["end"] - s["start"],
         "width": s.get("width"), "height": s.get("height")}
        for s in manifest.get("segments", [])
    ]  # fmt: skip
    described: dict[str, Any] = {"segments": segments}
    if segments:
        described["start_ms"] = segments[0]["wall_ms"]
        described["end_ms"] = segments[-1]["wall_ms"] + segments[-1]["duration"] * 1000.0
        described["start"] = manifest["segments"][0]["start"]
        described["end"] = manifest["segments"][-1]["end"]
    return described


def describe_png(archive: Archive, manifest: dict[str, Any], links: Links) -> dict[str, Any]:
    """A PNG stream's frames for the page: wall-clock time, and the byte range inside the
    batch at `url` that holds the PNG."""
    frames = []
    for batch in manifest.get("batches", []):
        url = links.object(archive.relative(batch["key"]))
        for frame in batch["frames"]:
            frames.append(
                {
                    "wall_ms": wall_ms(frame["absolute"]),
                    "relative": frame["relative"],
                    "url": url,
                    "offset": frame["offset"],
                    "size": frame["size"],
                    "width": frame.get("width"),
                    "height": frame.get("height"),
                }
            )
    described: dict[str, Any] = {"frames": frames}
    if frames:
        last_s = (
            frames[-1]["wall_ms"] - frames[-2]["wall_ms"] if len(frames) > 1 else 0.0
        ) / 1000.0 or _PNG_LAST_FRAME_S
        described["start_ms"] = frames[0]["wall_ms"]
        described["end_ms"] = frames[-1]["wall_ms"] + min(last_s, 5.0) * 1000.0
        described["start"] = frames[0]["relative"]
        described["end"] = frames[-1]["relative"] + min(last_s, 5.0)
    return described


async def recording_streams(archive: Archive, links: Links) -> dict[str, Any]:
    """What the page plays: every stream of the recording with its wall-clock range, and
    the recording's overall range (`start_ms` to `end_ms`)."""
    recording = links.recording
    session = await archive.session(recording)
    found = await archive.streams(recording)
    manifests = await asyncio.gather(*(archive.manifest(stream) for stream in found))
    streams = []
    for stream, manifest in zip(found, manifests, strict=True):
        entry: dict[str, Any] = {
            "participant_id": stream.participant_id,
            "name": _participant_name(session, manifest, stream.participant_id),
            "type": stream.type,
            "format": stream.format,
            "status": manifest.get("status"),
        }
        if stream.format == "h264" or stream.is_audio:
            entry["playlist_url"] = links.playlist(stream)
            entry.update(describe_timed(archive, manifest, links))
        else:
            entry.update(describe_png(archive, manifest, links))
        if "start_ms" in entry:
            streams.append(entry)
    streams.sort(key=lambda s: (s["participant_id"], s["type"], s["format"]))
    return {
        "bot_id": recording.bot_id,
        "recording_id": recording.recording_id,
        "start_ms": min((s["start_ms"] for s in streams), default=None),
        "end_ms": max((s["end_ms"] for s in streams), default=None),
        "streams": streams,
    }


@dataclass(frozen=True, slots=True)
class ViewerConfig:
    """What the viewer's routes need: the archive to read, who may look, hls.js."""

    store_url: str
    endpoint_url: str | None
    grant: Callable[[str | None], Grant | None]
    """The token check (constant time), the same as the bots': what a token allows."""
    hls_js: Path
    url_expiry_s: int = 3600


_ARCHIVE = web.AppKey("viewer_archive", Archive)
_CONFIG = web.AppKey("viewer_config", ViewerConfig)


def _authorized(request: web.Request) -> tuple[Archive, Links]:
    """The archive and the recording's links, once the token is accepted; the ids are
    checked like the write side's (only safe ids make keys)."""
    config = request.app[_CONFIG]
    token = request.query.get("token")
    grant = config.grant(token)
    if grant is None:
        raise web.HTTPUnauthorized(text="missing or wrong token\n")
    try:
        recording = RecordingId(
            safe_id("bot_id", request.match_info["bot_id"]),
            safe_id("recording_id", request.match_info["recording_id"]),
        )
    except InvalidIdError:
        raise web.HTTPNotFound(text="no such recording\n") from None
    if not grant.opens(recording.bot_id, recording.recording_id):
        # A bot's ingest token, or another recording's viewer token.
        raise web.HTTPUnauthorized(text="this token does not open this recording\n")
    expiry_s = config.url_expiry_s
    if grant.expiry is not None:
        # A link never outlives the token that asked for it.
        expiry_s = max(1, min(expiry_s, math.floor(grant.expiry - time.time())))
    archive = request.app[_ARCHIVE]
    return archive, Links(archive.store, recording, token or "", expiry_s)


async def _page(request: web.Request) -> web.FileResponse:
    _authorized(request)
    return web.FileResponse(PAGE_DIR / "index.html", headers=_PAGE_HEADERS)


async def _asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    config = request.app[_CONFIG]
    assets = {"hls.min.js": config.hls_js, **{p.name: p for p in PAGE_DIR.glob("*.[jc]s*")}}
    if name not in assets or name == "index.html":
        raise web.HTTPNotFound()
    return web.FileResponse(assets[name], headers={"Cache-Control": "public, max-age=3600"})


async def _streams(request: web.Request) -> web.Response:
    archive, links = _authorized(request)
    try:
        body = await recording_streams(archive, links)
    except (DamagedObjectError, StoreError) as exc:
        raise web.HTTPBadGateway(text=f"cannot read the recording: {exc}\n") from None
    if not body["streams"]:
        raise web.HTTPNotFound(text="no such recording, or no streams in it yet\n")
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def _playlist(request: web.Request) -> web.Response:
    archive, links = _authorized(request)
    source = request.match_info["type"]
    try:
        participant = safe_id("participant_id", request.match_info["participant_id"])
    except InvalidIdError:
        raise web.HTTPNotFound() from None
    folder = f"{links.recording.prefix}/participants/{participant}/{source}"
    # A participant's audio is in the one codec its service was set to: FLAC, else Opus.
    formats = sorted(AUDIO_FORMATS) if source == "audio" else ["h264"]
    for media_format in formats:
        stream = parse_stream_key(f"{folder}/{media_format}/{MANIFEST_NAME}")
        if stream is None:
            raise web.HTTPNotFound()
        try:
            manifest = await archive.document(stream.manifest_key)
        except (DamagedObjectError, StoreError) as exc:
            raise web.HTTPBadGateway(text=f"cannot read the manifest: {exc}\n") from None
        if manifest is not None:
            break
    else:
        raise web.HTTPNotFound(text="no such stream\n")
    text = rewrite_playlist(render_playlist(manifest), stream.folder, links.object)
    return web.Response(
        text=text,
        content_type=PLAYLIST_CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )


_OBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""One part of an object key below a recording, as `archiver.layout` names them."""


async def _object(request: web.Request) -> web.Response:
    """An object of the recording, whole or one byte range (PNG frames): how a store that
    cannot presign URLs reaches the browser."""
    archive, links = _authorized(request)
    inside = request.match_info["key"]
    parts = inside.split("/")
    if parts[0] != "participants" or not all(_OBJECT_NAME.fullmatch(part) for part in parts):
        # What the write side builds, only: no `..`, no NUL, nothing a store would choke on.
        raise web.HTTPNotFound()
    key = f"{links.recording.prefix}/{inside}"
    content_type = _CONTENT_TYPES.get(posixpath.splitext(key)[1], "application/octet-stream")
    headers = {"Cache-Control": "private, max-age=3600", "Accept-Ranges": "bytes"}
    try:
        wanted = request.http_range
    except ValueError:
        raise web.HTTPRequestRangeNotSatisfiable() from None
    try:
        if wanted.start is not None and wanted.stop is not None and wanted.start >= 0:
            body = await archive.store.get_range(key, wanted.start, wanted.stop - wanted.start)
            if body is None:
                raise web.HTTPNotFound()
            headers["Content-Range"] = f"bytes {wanted.start}-{wanted.start + len(body) - 1}/*"
            return web.Response(body=body, status=206, content_type=content_type, headers=headers)
        body = await archive.store.get(key)
    except StoreError as exc:
        raise web.HTTPBadGateway(text=f"cannot read the object: {exc}\n") from None
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(body=body, content_type=content_type, headers=headers)


def add_viewer(app: web.Application, config: ViewerConfig) -> None:
    """Serve the viewer from `app`; it opens its own read-only view of the store."""
    app[_CONFIG] = config

    async def archive_lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = store_from_url(config.store_url, config.endpoint_url)
        app[_ARCHIVE] = Archive(store)
        yield
        await store.close()

    app.cleanup_ctx.append(archive_lifecycle)
    recording = "/recordings/{bot_id}/{recording_id}"
    app.router.add_get(recording, _page)
    app.router.add_get(recording + "/streams.json", _streams)
    app.router.add_get(
        recording + "/playlists/{participant_id}/{type:webcam|screenshare|audio}.m3u8", _playlist
    )
    app.router.add_get(recording + "/objects/{key:.+}", _object)
    app.router.add_get("/viewer/{name}", _asset)
