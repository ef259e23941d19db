"""HLS playlists: rendered from the manifest, parsed by a player's library, played by FFmpeg
across resolution changes and segments without key frames, also those of a stream continued
mid-GOP on another task (with no discontinuity, even across frames never received)."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import m3u8
import numpy as np
import orjson
import pytest

from archiver.documents.playlists import discontinuous, render_playlist
from archiver.layout import RecordingId
from tests.consumers.conftest import SPOKEN_FROM_S, Continue, Simulate, sent_pictures, talk

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


def test_a_segment_continuing_mid_gop_never_resets_the_player_behind_its_configuration() -> None:
    segments = [
        segment(0.0, 2.0, "a"),
        segment(2.0, 3.0, "a", keyframe=False),  # continued on another task
        segment(6.0, 7.0, "a", keyframe=False),  # after 3 s never received: still continues
        segment(9.0, 10.0, "a"),  # a pause, then a key frame: the timeline jumps
        segment(10.0, 11.0, "b"),  # a new configuration
    ]
    playlist = m3u8.loads(render_playlist({"status": "complete", "segments": segments}))
    assert [s.discontinuity for s in playlist.segments] == [False, False, False, True, True]
    assert [s.init_section.uri for s in playlist.segments] == ["init-a.mp4"] * 4 + ["init-b.mp4"]
    # Without a key frame behind another configuration it cannot continue: a reset anyway.
    assert discontinuous(segments[1], segment(3.0, 4.0, "b", keyframe=False))
    assert not discontinuous(segments[0], segments[1])


def ffmpeg_frames(playlist: Path) -> list[tuple[float, str]]:
    """What the `ffmpeg` command decodes of a playlist: (time, MD5 of the picture) each."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-copyts", "-i", str(playlist),
               "-fps_mode", "passthrough", "-f", "framemd5", "-"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no decoding error either
    lines = result.stdout.splitlines()
    time_base = Fraction(next(line for line in lines if line.startswith("#tb 0:"))[6:].strip())
    frames = []
    for line in lines:
        if not line.startswith("#"):
            _, _, pts, _, _, md5 = (field.strip() for field in line.split(","))
            frames.append((round(float(int(pts) * time_base), 6), md5))
    return frames


@pytest.mark.parametrize(
    ("seconds", "then"),
    [(4.0, (20, 40)), (6.0, (50, 60))],
    ids=["reconnect", "reconnect-after-3-s-away"],
)
async def test_ffmpeg_plays_every_frame_of_a_stream_continued_mid_gop(
    continued_local: Continue, seconds: float, then: tuple[int, int]
) -> None:
    archived = await continued_local(seconds=seconds, then=then)
    folder = Path(archived.store_url.removeprefix("file://")) / archived.stream_prefix(
        100, "webcam", "h264"
    )
    manifest = orjson.loads((folder / "manifest.json").read_bytes())
    continuing = next(s for s in manifest["segments"] if s["start"] == archived.reconnect_s)
    assert not continuing["starts_with_keyframe"]
    playlist = m3u8.load(str(folder / "playlist.m3u8"))
    assert [s.discontinuity for s in playlist.segments] == [False] * len(manifest["segments"])
    init = continuing["init_key"].rpartition("/")[2]
    assert {s.init_section.uri for s in playlist.segments} == {init}

    decoded = ffmpeg_frames(folder / "playlist.m3u8")
    sent = sent_pictures(archived.units)
    if then[0] == 20:
        assert decoded == sent  # every frame, at its time, as the sender's stream decodes
        return
    # After 3 s away the frames refer to pictures never received: FFmpeg conceals away the
    # first one or few, and decodes the rest at their times.
    assert decoded[:20] == sent[:20]
    after = [t for t, _ in decoded[20:]]
    assert 7 <= len(after) <= 10
    assert after == [round(t, 6) for t, _ in archived.units[-len(after) :]]
    assert after[-1] == pytest.approx(5.9)


async def test_ffmpeg_plays_a_participants_webcam_with_their_audio_from_one_playlist(
    local_archive: Simulate,
) -> None:
    talking = await talk(local_archive)
    archived = talking.archived
    folder = Path(archived.store_url.removeprefix("file://"))
    recording = RecordingId(archived.bot_id, archived.recording_id)

    for stream in archived.simulations[0].streams:
        path = folder / recording.participant_playlist_key(str(stream.participant_id))
        variants = m3u8.load(str(path))
        [rendition] = variants.media
        assert (rendition.type, rendition.uri) == ("AUDIO", "audio/flac/playlist.m3u8")
        assert [p.uri for p in variants.playlists] == ["webcam/h264/playlist.m3u8"]
        audio_playlist = m3u8.load(str(path.parent / "audio/flac/playlist.m3u8"))
        assert audio_playlist.is_endlist
        assert [s.discontinuity for s in audio_playlist.segments] == [False]

        with av.open(str(path)) as container:
            kinds = sorted(s.type for s in container.streams)
            first_video = next(container.decode(video=0))
        with av.open(str(path)) as container:
            audio_frames = list(container.decode(audio=0))
        assert kinds == ["audio", "video"]
        assert float(first_video.pts * first_video.time_base) == pytest.approx(
            SPOKEN_FROM_S, abs=1e-3
        )
        start = audio_frames[0].pts * audio_frames[0].time_base
        assert float(start) == pytest.approx(SPOKEN_FROM_S, abs=0.002)
        heard = np.concatenate([f.to_ndarray().reshape(-1) for f in audio_frames])
        assert np.array_equal(heard, np.frombuffer(talking.pcm[stream.participant_id], "<i2"))
