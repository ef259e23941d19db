"""The viewer's routes without a browser: off by default, behind the bots' tokens, the
streams it lists, and playlists whose URIs the browser can fetch (the service's own for a
local folder, presigned for S3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import m3u8
import pytest

from archiver.consumers.viewer import rewrite_playlist
from archiver.errors import ConfigError
from archiver.service.app import create_app
from archiver.settings import Settings
from tests.conftest import TOKEN, ServiceFactory
from tests.consumers.conftest import SPEAKERS, Viewing, talk

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def get(url: str, **kwargs: Any) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        return response.status, await response.read(), dict(response.headers)


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def test_rewrite_playlist_resolves_each_uri_against_the_stream_folder() -> None:
    text = (
        "#EXTM3U\n#EXT-X-VERSION:7\n"
        '#EXT-X-MAP:URI="init-aa.mp4"\n#EXTINF:1.000000,\nsegments/0000000000000.m4s\n'
        "#EXT-X-DISCONTINUITY\n"
        '#EXT-X-MAP:URI="init-bb.mp4"\n#EXTINF:1.000000,\nsegments/0000000090000.m4s\n'
        "#EXT-X-ENDLIST\n"
    )
    folder = "b/r/participants/1/webcam/h264"
    rewritten = rewrite_playlist(text, folder, lambda key: f"https://x/{key}?sig=1")
    parsed = m3u8.loads(rewritten)
    assert [s.uri for s in parsed.segments] == [
        f"https://x/{folder}/segments/0000000000000.m4s?sig=1",
        f"https://x/{folder}/segments/0000000090000.m4s?sig=1",
    ]
    assert [s.init_section.uri for s in parsed.segments] == [
        f"https://x/{folder}/init-aa.mp4?sig=1",
        f"https://x/{folder}/init-bb.mp4?sig=1",
    ]
    assert parsed.is_endlist
    assert [s.discontinuity for s in parsed.segments] == [False, True]


async def test_the_viewer_is_off_by_default(service: ServiceFactory) -> None:
    running = await service()
    status, _, _ = await get(f"{running.http}/recordings/b/r?token={TOKEN}")
    assert status == 404
    status, _, _ = await get(f"{running.http}/viewer/hls.min.js")
    assert status == 404


def test_a_missing_hls_js_stops_start_up(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        auth_tokens=TOKEN,
        viewer=True,
        viewer_hls_js_path=str(tmp_path / "nowhere.js"),
    )
    with pytest.raises(ConfigError, match="npm ci --prefix viewer"):
        create_app(settings)


async def test_every_route_wants_a_token(file_viewer: Viewing) -> None:
    await file_viewer.simulate(participants=1, seconds=2, fps=10)
    listing = await get_json(file_viewer.recording_url("/streams.json"))
    playlist = listing["streams"][0]["playlist_url"].partition("?")[0]
    urls = [
        file_viewer.recording_url(token=None),
        file_viewer.recording_url("/streams.json", token=None),
        f"{file_viewer.http}{playlist}",
    ]
    for url in urls:
        for suffix in ("", "?token=", "?token=wrong"):
            status, _, _ = await get(url + suffix)
            assert status == 401, url + suffix
    status, page, headers = await get(file_viewer.recording_url())
    assert status == 200
    assert b"/viewer/hls.min.js" in page
    assert headers["Referrer-Policy"] == "no-referrer"
    status, script, _ = await get(f"{file_viewer.http}/viewer/hls.min.js")
    assert status == 200
    assert b"Hls" in script
    status, _, _ = await get(file_viewer.recording_url("/streams.json").replace("/r", "/r~"))
    assert status in (401, 404)


async def test_a_file_store_is_served_by_the_service(file_viewer: Viewing) -> None:
    await file_viewer.simulate(participants=2, seconds=3, fps=10, resize_at_s=1.5)
    await file_viewer.simulate(
        participants=1, seconds=3, fps=2, format="png", first_participant_id=300
    )
    listing = await get_json(file_viewer.recording_url("/streams.json"))
    streams = listing["streams"]
    assert [(s["participant_id"], s["format"]) for s in streams] == [
        ("100", "h264"),
        ("101", "h264"),
        ("300", "png"),
    ]
    assert listing["start_ms"] == min(s["start_ms"] for s in streams)
    assert listing["end_ms"] == max(s["end_ms"] for s in streams)
    for stream in streams[:2]:
        assert stream["name"] == f"Participant {stream['participant_id']}"
        assert stream["status"] == "complete"
        assert stream["end_ms"] - stream["start_ms"] == pytest.approx(3000, abs=150)
        assert {(s["width"], s["height"]) for s in stream["segments"]} == {
            (320, 240),
            (480, 272),
        }
        status, text, _ = await get(file_viewer.http + stream["playlist_url"])
        assert status == 200
        playlist = m3u8.loads(text.decode())
        assert playlist.is_endlist
        assert sum(s.duration for s in playlist.segments) == pytest.approx(
            sum(s["duration"] for s in stream["segments"]), abs=1e-3
        )
        uris = {s.uri for s in playlist.segments} | {s.init_section.uri for s in playlist.segments}
        for uri in uris:
            assert uri.startswith(f"/recordings/{listing['bot_id']}/"), uri
            assert uri.endswith(f"?token={TOKEN}"), uri
            status, body, _ = await get(file_viewer.http + uri)
            assert status == 200, uri
            assert body[4:8] in (b"ftyp", b"styp", b"moof"), uri
    png = streams[2]
    assert len(png["frames"]) == 6
    for frame in png["frames"][:2]:
        wanted = f"bytes={frame['offset']}-{frame['offset'] + frame['size'] - 1}"
        status, body, _ = await get(file_viewer.http + frame["url"], headers={"Range": wanted})
        assert status == 206
        assert len(body) == frame["size"]
        assert body.startswith(PNG_SIGNATURE)
    objects = png["frames"][0]["url"].partition("/objects/")[0] + "/objects"
    hostile = ("/participants/%00", "/participants/a%00b/x.m4s", "/participants/" + "a" * 300)
    for outside in ("/../session.json", "/session.json", "/participants/../../x", *hostile):
        status, _, _ = await get(f"{file_viewer.http}{objects}{outside}?token={TOKEN}")
        assert status == 404, outside


async def test_an_s3_store_is_played_by_presigned_urls(
    s3_viewer: Viewing, capsys: pytest.CaptureFixture[str]
) -> None:
    await s3_viewer.simulate(participants=1, seconds=3, fps=10, resize_at_s=1.5)
    await s3_viewer.simulate(
        participants=1, seconds=2, fps=2, format="png", first_participant_id=300
    )
    listing = await get_json(s3_viewer.recording_url("/streams.json"))
    video, png = listing["streams"]
    status, text, _ = await get(s3_viewer.http + video["playlist_url"])
    assert status == 200
    playlist = m3u8.loads(text.decode())
    assert len({s.init_section.uri for s in playlist.segments}) == 2
    for segment in playlist.segments:
        for uri in (segment.uri, segment.init_section.uri):
            assert "X-Amz-Signature=" in uri, uri
            assert TOKEN not in uri
            status, body, _ = await get(uri)
            assert status == 200, uri
            assert body[4:8] in (b"ftyp", b"styp", b"moof"), uri
    frame = png["frames"][0]
    assert "X-Amz-Signature=" in frame["url"]
    wanted = f"bytes={frame['offset']}-{frame['offset'] + frame['size'] - 1}"
    status, body, _ = await get(frame["url"], headers={"Range": wanted})
    assert status == 206
    assert body.startswith(PNG_SIGNATURE)
    assert len(body) == frame["size"]
    assert TOKEN not in capsys.readouterr().out


async def test_a_voice_is_listed_with_a_playlist_of_fetchable_segments(
    talking_viewer: Viewing,
) -> None:
    """Each participant's audio is one more stream in `streams.json`, with its segments'
    wall-clock places on the video's timeline and an HLS playlist (two segments either
    side of 101's gap, a discontinuity between them) whose every URI the page can fetch."""
    await talk(talking_viewer.archived)
    listing = await get_json(talking_viewer.recording_url("/streams.json"))
    by_stream = {(s["participant_id"], s["type"]): s for s in listing["streams"]}
    for pid in SPEAKERS:
        voice, webcam = by_stream[(str(pid), "audio")], by_stream[(str(pid), "webcam")]
        assert voice["format"] == "flac"
        # Both started at SPOKEN_FROM_S on the same wall clock.
        assert voice["start_ms"] == pytest.approx(webcam["start_ms"], abs=1.0)
    voice = by_stream[("101", "audio")]
    playlist_url = talking_viewer.http + voice["playlist_url"]
    status, body, _ = await get(playlist_url)
    assert status == 200, body
    playlist = m3u8.loads(body.decode())
    assert len(playlist.segments) == len(voice["segments"]) >= 3
    assert any(s.discontinuity for s in playlist.segments)
    uris = {s.init_section.uri for s in playlist.segments} | {s.uri for s in playlist.segments}
    for uri in uris:
        status, data, _ = await get(talking_viewer.http + uri)
        assert status == 200, uri
        assert data, uri
    # A participant with no audio has no audio playlist.
    status, _, _ = await get(playlist_url.replace("/101/audio.m3u8", "/999/audio.m3u8"))
    assert status == 404
