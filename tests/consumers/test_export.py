"""`archiver export`: standard MP4s that decode to the segments' frames at their times (a
stream continued mid-GOP on another task in one file), PNG frames byte for byte, the
events as JSON Lines."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import wave
from pathlib import Path

import av
import numpy as np
import orjson
import pytest

from archiver.cli import main
from archiver.consumers.decode_check import check_events, check_stream
from archiver.layout import RecordingId
from archiver.store import S3Store
from tests.consumers.conftest import (
    SPOKEN_FROM_S,
    Archived,
    Continue,
    Simulate,
    picture_md5,
    sent_pictures,
    talk,
)


def decode(path: Path) -> list[tuple[float, int, int]]:
    with av.open(str(path)) as container:
        return [
            (round(float(frame.pts * frame.time_base), 6), frame.width, frame.height)
            for frame in container.decode(video=0)
        ]


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def top_level_boxes(path: Path) -> list[str]:
    data, boxes, at = path.read_bytes(), [], 0
    while at < len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        if size == 1:
            size = struct.unpack_from(">Q", data, at + 8)[0]
        boxes.append(kind.decode())
        at += size
    return boxes


async def run_export(archived: Archived, output: Path, *args: str) -> int:
    command = ["export", archived.store_url, *archived.endpoint_args, *archived.ids]
    return await asyncio.to_thread(main, [*command, "--output", str(output), *args])


async def test_export_remuxes_each_configuration_and_copies_pngs_and_events(
    s3_archive: Simulate, tmp_path: Path
) -> None:
    archived = await s3_archive(
        participants=1, seconds=4, fps=10, resize_at_s=2.0, start_relative_s=1.5
    )
    await s3_archive(participants=1, seconds=3, format="png", fps=2, first_participant_id=300)
    assert archived.endpoint_url is not None
    store = S3Store(archived.store_url.split("/")[2], "archive", archived.endpoint_url)
    manifest_key = f"{archived.stream_prefix(100, 'webcam', 'h264')}/manifest.json"
    segments = await check_stream(store, manifest_key, key_prefix="archive/")
    events = await check_events(
        store, RecordingId(archived.bot_id, archived.recording_id), key_prefix="archive/"
    )
    await store.close()

    assert await run_export(archived, tmp_path / "out") == 0
    out = tmp_path / "out"
    assert names(out) == [
        "100-webcam-1.mp4",
        "100-webcam-2.mp4",
        "300-webcam-png",
        "events.jsonl",
        "session.json",
    ]
    exported = decode(out / "100-webcam-1.mp4") + decode(out / "100-webcam-2.mp4")
    expected = [(round(f.time_s, 6), f.width, f.height) for f in segments.frames]
    assert exported == expected
    assert len(exported) == 40
    assert exported[0] == (1.5, 320, 240)
    assert exported[-1][1:] == (480, 272)
    for name in ("100-webcam-1.mp4", "100-webcam-2.mp4"):
        boxes = top_level_boxes(out / name)
        assert boxes.index("moov") < boxes.index("mdat")
        assert "moof" not in boxes

    [png_stream] = archived.simulations[1].streams
    frames = sorted((out / "300-webcam-png").iterdir())
    assert [p.name for p in frames] == [
        f"{int(f.relative_s):06d}.{round(f.relative_s % 1 * 1e6):06d}.png" for f in png_stream.sent
    ]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in frames] == [
        f.sha256 for f in png_stream.sent
    ]
    lines = (out / "events.jsonl").read_bytes().splitlines()
    assert lines == events.lines
    assert orjson.loads((out / "session.json").read_bytes())["recording"]["id"] == (
        archived.recording_id
    )


async def test_export_reencodes_one_stream_to_one_size(
    s3_archive: Simulate, tmp_path: Path
) -> None:
    archived = await s3_archive(participants=2, seconds=3, fps=10, resize_at_s=1.5)
    status = await run_export(
        archived, tmp_path, "--participant", "101", "--type", "webcam", "--reencode", "320x240"
    )
    assert status == 0
    assert names(tmp_path) == ["101-webcam.mp4"]
    exported = decode(tmp_path / "101-webcam.mp4")
    sent = archived.simulations[0].streams[1].sent
    assert [t for t, _, _ in exported] == pytest.approx([f.relative_s for f in sent], abs=1e-4)
    assert {(w, h) for _, w, h in exported} == {(320, 240)}


def pictures(path: Path) -> list[tuple[float, str]]:
    with av.open(str(path)) as container:
        return [
            (round(float(frame.pts * frame.time_base), 6), picture_md5(frame))
            for frame in container.decode(video=0)
        ]


async def test_export_of_a_stream_continued_mid_gop_is_one_mp4_of_every_frame_sent(
    continued_s3: Continue, tmp_path: Path
) -> None:
    archived = await continued_s3()
    assert await run_export(archived, tmp_path) == 0
    assert names(tmp_path) == ["100-webcam.mp4", "session.json"]
    exported = pictures(tmp_path / "100-webcam.mp4")
    assert exported == sent_pictures(archived.units)
    assert [t for t, _ in exported] == [
        f.relative_s for f in archived.simulations[0].streams[0].sent
    ]
    assert len(exported) == 40


async def test_export_reports_a_stream_whose_listing_begins_mid_gop(
    continued_local: Continue, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the first listed segment continues is not in the archive (lost): its frames are
    exported as archived, and the export says they do not decode."""
    archived = await continued_local()
    path = Path(archived.store_url.removeprefix("file://")) / archived.manifest_key
    manifest = orjson.loads(path.read_bytes())
    listed = [s for s in manifest["segments"] if s["start"] >= archived.reconnect_s]
    path.write_bytes(orjson.dumps({**manifest, "segments": listed}))
    capsys.readouterr()

    assert await run_export(archived, tmp_path / "remuxed") == 1
    err = capsys.readouterr().err
    assert f"100-webcam.mp4: {listed[0]['key']} at 2.000 s does not start with a key frame" in err
    assert "20 frames up to its end decode with artefacts, if at all" in err
    with av.open(str(tmp_path / "remuxed" / "100-webcam.mp4")) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        times = [round(float(p.pts * p.time_base), 6) for p in packets]
    assert times == [round(t, 6) for t, _ in archived.units[20:]]

    status = await run_export(archived, tmp_path / "reencoded", "--reencode", "320x240")
    assert status == 1
    err = capsys.readouterr().err
    assert "20 frames up to its end do not decode: left out" in err
    # Nothing else in it decodes: no file.
    assert "100-webcam.mp4: no frame decodes, not written" in err
    assert names(tmp_path / "reencoded") == ["session.json"]


async def test_export_writes_each_participants_audio_as_a_wav_aligned_to_the_sample(
    local_archive: Simulate, tmp_path: Path
) -> None:
    talking = await talk(local_archive)
    assert await run_export(talking.archived, tmp_path / "out") == 0

    out = tmp_path / "out"
    lengths = set()
    for participant_id, pcm in talking.pcm.items():
        with wave.open(str(out / f"{participant_id}-audio.wav"), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16_000, 1, 2)
            samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        lengths.add(len(samples))
        first = round(SPOKEN_FROM_S * 16_000)
        assert not samples[:first].any()
        assert np.array_equal(samples[first : first + len(pcm) // 2], np.frombuffer(pcm, "<i2"))
    assert len(lengths) == 1


async def test_the_webcam_mp4_carries_its_participants_audio_within_10_ms_of_the_video(
    local_archive: Simulate, tmp_path: Path
) -> None:
    talking = await talk(local_archive)
    assert await run_export(talking.archived, tmp_path / "out", "--type", "webcam") == 0

    sim = talking.archived.simulations[0]
    for stream in sim.streams:
        with av.open(str(tmp_path / "out" / f"{stream.participant_id}-webcam.mp4")) as mp4:
            video = [round(float(f.pts * f.time_base), 6) for f in mp4.decode(video=0)]
            mp4.seek(0)
            heard = [
                (float(f.pts * f.time_base), f.to_ndarray().reshape(-1))
                for f in mp4.decode(audio=0)
            ]
        # The video: every frame at the time it was sent.
        video_offset = max(abs(d - s.relative_s) for d, s in zip(video, stream.sent, strict=True))
        # The audio: where the participant's first words play, against their timestamp.
        spoken = np.frombuffer(talking.pcm[stream.participant_id], "<i2")
        samples = np.concatenate([s for _, s in heard])
        probe = spoken[16_000:16_400]
        assert np.abs(probe).max() > 1000  # speech, not a pause that matches any pause
        found = next(
            i for i in range(len(samples) - 400) if np.array_equal(samples[i : i + 400], probe)
        )
        audio_offset = heard[0][0] + found / 16_000 - (SPOKEN_FROM_S + 1.0)
        assert abs(audio_offset - video_offset) <= 0.010, (audio_offset, video_offset)
