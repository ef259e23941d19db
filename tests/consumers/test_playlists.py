"""HLS playlists: rendered from the manifest, parsed by a player's library, played by FFmpeg
across resolution changes and segments without key frames."""

from __future__ import annotations

from pathlib import Path

import av
import m3u8
import orjson
import pytest

from archiver.playlists import render_playlist
from tests.consumers.conftest import Simulate

WALL = "2026-11-26T10:00:00.000000+00:00"


def segment(start: float, end: float, init: str, keyframe: bool = True) -> dict[str, object]:
    base = "archive/b/r/participants/1/webcam/h264"
    return {
        "key": f"{base}/segments/{round(start * 90_000):013d}.m4s",
        "init_key": f"{base}/init-{init}.mp4",
        "start": start,
        "end": end,
        "start_wallclock": WALL.replace("10:00:00", f"10:00:{int(start):02d}"),
        "starts_with_keyframe": keyframe,
    }


def test_playlist_maps_each_configuration_and_marks_discontinuities() -> None:
    segments = [
        segment(1.0, 3.0, "a"),
        segment(3.0, 5.5, "a", keyframe=False),  # continues: no discontinuity
        segment(5.5, 7.0, "b"),  # new configuration
        segment(20.0, 22.0, "b"),  # the timeline jumps
    ]
    live = m3u8.loads(render_playlist({"status": "live", "segments": segments}))
    assert live.playlist_type == "event"
    assert not live.is_endlist
    assert live.target_duration == 3
    assert [s.uri for s in live.segments] == [
        "segments/0000000090000.m4s",
        "segments/0000000270000.m4s",
        "segments/0000000495000.m4s",
        "segments/0000001800000.m4s",
    ]
    assert [s.init_section.uri for s in live.segments] == [
        "init-a.mp4",
        "init-a.mp4",
        "init-b.mp4",
        "init-b.mp4",
    ]
    assert [s.discontinuity for s in live.segments] == [False, False, True, True]
    assert [s.duration for s in live.segments] == [2.0, 2.5, 1.5, 2.0]
    assert live.segments[3].program_date_time.isoformat() == "2026-11-26T10:00:20+00:00"

    complete = m3u8.loads(render_playlist({"status": "complete", "segments": segments}))
    assert complete.is_endlist
    assert m3u8.loads(render_playlist({"status": "live", "segments": []})).segments == []


async def test_ffmpeg_plays_every_frame_across_a_resolution_change(
    local_archive: Simulate,
) -> None:
    # One key frame per configuration and 0.5 s segments: most segments start without one.
    archived = await local_archive(
        participants=1, seconds=4, fps=10, resize_at_s=2.0, start_relative_s=3.25
    )
    folder = Path(archived.store_url.removeprefix("file://"))
    stream = folder / archived.stream_prefix(100, "webcam", "h264")
    manifest = orjson.loads((stream / "manifest.json").read_bytes())
    playlist = m3u8.load(str(stream / "playlist.m3u8"))

    assert playlist.is_endlist
    assert len(playlist.segments) == len(manifest["segments"]) == 4
    assert not all(s["starts_with_keyframe"] for s in manifest["segments"])
    assert len({s.init_section.uri for s in playlist.segments}) == 2
    assert sum(s.discontinuity for s in playlist.segments) == 1
    for listed, entry in zip(playlist.segments, manifest["segments"], strict=True):
        assert entry["key"].endswith(listed.uri)
        assert listed.program_date_time.isoformat(timespec="milliseconds") == (
            entry["start_wallclock"][:23] + "+00:00"
        )

    with av.open(str(stream / "playlist.m3u8")) as container:
        decoded = [
            (float(frame.pts * frame.time_base), frame.width, frame.height)
            for frame in container.decode(video=0)
        ]
    sent = archived.simulations[0].streams[0].sent
    assert len(decoded) == len(sent) == 40
    for (time_s, width, height), frame in zip(decoded, sent, strict=True):
        assert time_s == pytest.approx(frame.relative_s, abs=1e-4)
        assert (width, height) == (frame.width, frame.height)

    session = orjson.loads(
        (folder / archived.bot_id / archived.recording_id / "session.json").read_bytes()
    )
    [entry] = session["streams"]
    assert entry["playlist_key"] == archived.stream_prefix(100, "webcam", "h264") + "/playlist.m3u8"
    assert entry["start"] == pytest.approx(3.25)
    assert entry["end"] == pytest.approx(7.25)
