"""The viewer in a real browser: headless Chromium (Debian's `chromium` package, which CI
installs) plays an archived meeting through hls.js, served by the real service; and a
stream continued mid-GOP on another task, through the reconnect.

Not skipped when Chromium is missing: CI installs it, and a viewer nobody played is not
tested.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from playwright.async_api import Page, async_playwright

from tests.consumers.conftest import (
    SILENT_S,
    SPEAKERS,
    SPOKEN_FROM_S,
    ContinueViewing,
    Viewing,
    sent_pictures,
    talk,
)
from tests.speech import meeting_audio, send_audio, speaker

CHROMIUM = "/usr/bin/chromium"
SYNC_S = 0.1
_VIDEOS = """[...document.querySelectorAll("video")].map((video) => ({
  current_time: video.currentTime,
  rendered: video.getVideoPlaybackQuality().totalVideoFrames,
}))"""
"""What each video element (in page order) played: its position, and how many frames it
decoded and showed (or dropped for being late)."""
_BROKEN_MEDIA = {"fragParsingError", "bufferAppendError", "bufferAddCodecError", "fragGap"}


async def play_to_the_end(
    viewing: Viewing, before_play: Callable[[Page], Awaitable[None]] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Open the viewer, do `before_play`, press play, wait for the end; the page's report
    (with `videos`, what the video elements played) and what the browser logged as errors."""
    assert shutil.which(CHROMIUM), (
        f"{CHROMIUM} is missing: `apt-get install -y chromium` (CI's .ci/run installs it)"
    )
    console: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required"]
        )
        try:
            page = await browser.new_page()
            page.on(
                "console",
                lambda m: console.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: console.append(str(e)))
            await page.goto(viewing.recording_url())
            # Polled from here: wait_for_function evaluates strings, which the page's CSP
            # forbids (and should).
            deadline = time.monotonic() + 10
            while not await page.evaluate("Boolean(window.viewer && window.viewer.ready)"):
                assert time.monotonic() < deadline, (await page.content(), console)
                await asyncio.sleep(0.1)
            if before_play is not None:
                await before_play(page)
            await page.click("#play")
            deadline = time.monotonic() + 25
            report: dict[str, Any] = await page.evaluate("window.viewer.report()")
            while not report["finished"] and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                report = await page.evaluate("window.viewer.report()")
            report["videos"] = await page.evaluate(_VIDEOS)
            return report, console
        finally:
            await browser.close()


def check_played_in_sync(report: dict[str, Any], console: list[str], streams: int) -> None:
    assert report["finished"], report
    assert len(report["streams"]) == streams, report
    for stream in report["streams"]:
        name = f"{stream['participant_id']} {stream['type']}"
        assert not stream["errors"], (name, stream["errors"])
        assert stream["media_error"] is None, name
        assert stream["ended"], (name, stream)
        sizes = {tuple(size) for size in stream["sizes"] if size != [0, 0]}
        assert sizes == {(320, 240), (480, 272)}, (name, stream["sizes"])
        assert stream["max_time"] > 5.5, (name, stream["max_time"])
        assert stream["samples"] > 50, (name, stream["samples"])
        assert stream["max_drift"] < SYNC_S, (name, stream["max_drift"])
    assert not console, console


@pytest.mark.timeout(90)
async def test_viewer_plays_a_meeting_in_sync_from_a_file_store(file_viewer: Viewing) -> None:
    await file_viewer.simulate(participants=2, seconds=6, fps=15, resize_at_s=3.0)
    report, console = await play_to_the_end(file_viewer)
    check_played_in_sync(report, console, streams=2)


@pytest.mark.timeout(90)
async def test_viewer_plays_a_meeting_in_sync_from_s3(
    s3_viewer: Viewing, s3: Any, bucket: str
) -> None:
    # The page and the bucket are different origins: the bucket allows GETs from the page
    # (README: the bucket's CORS rule).
    s3.put_bucket_cors(
        Bucket=bucket,
        CORSConfiguration={
            "CORSRules": [
                {"AllowedOrigins": [s3_viewer.http], "AllowedMethods": ["GET"],
                 "AllowedHeaders": ["Range"], "MaxAgeSeconds": 3600}
            ]
        },
    )  # fmt: skip
    await s3_viewer.simulate(participants=2, seconds=6, fps=15, resize_at_s=3.0)
    report, console = await play_to_the_end(s3_viewer)
    check_played_in_sync(report, console, streams=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("seconds", "then"),
    [(3.0, (15, 30)), (4.0, (25, 40))],
    ids=["reconnect", "reconnect-after-1-s-away"],
)
async def test_viewer_plays_a_stream_continued_mid_gop_through_the_reconnect(
    continued_viewer: ContinueViewing, seconds: float, then: tuple[int, int]
) -> None:
    """The bot reconnected to another task after 1.5 s: the segments from there on start
    without a key frame, and hls.js decodes them on from the ones before (after 1 s away,
    too: the page holds the picture through the gap, on the wall clock)."""
    viewing, archived = await continued_viewer(seconds=seconds, first=(0, 15), then=then)
    report, console = await play_to_the_end(viewing)
    assert report["finished"], report
    [stream] = report["streams"]
    assert not stream["errors"], stream["errors"]
    assert stream["media_error"] is None
    broken = [w for w in stream["warnings"] if w.partition(": ")[2] in _BROKEN_MEDIA]
    assert not broken, stream["warnings"]
    assert stream["ended"], stream
    assert not console, console

    manifest = orjson.loads(
        (Path(archived.store_url.removeprefix("file://")) / archived.manifest_key).read_bytes()
    )
    segments = manifest["segments"]
    continuing = next(i for i, s in enumerate(segments) if s["start"] == archived.reconnect_s)
    assert not segments[continuing]["starts_with_keyframe"]
    # Playlist positions: where the continuing segments begin, and the end.
    reconnect = sum(s["end"] - s["start"] for s in segments[:continuing])
    total = sum(s["end"] - s["start"] for s in segments)
    assert stream["max_time"] > reconnect + 0.5, stream
    assert stream["max_time"] == pytest.approx(total, abs=0.1)
    # Every frame that decodes is shown: all of them, or after frames never received all
    # but the few that refer to those too closely, which FFmpeg conceals away as well.
    [video] = report["videos"]
    decodable = len(sent_pictures(archived.units))
    assert decodable == len(archived.units) if then[0] == 15 else decodable >= 20
    assert video["rendered"] == decodable, (video, stream)
    assert stream["samples"] > 20, stream
    assert stream["max_drift"] < SYNC_S, stream


LISTENER = 103
"""Sends audio and no video: the viewer gives them a tile of their own."""


async def _muted(page: Page) -> dict[str, bool]:
    report = await page.evaluate("window.viewer.report()")
    return {s["participant_id"]: s["muted"] for s in report["streams"] if s["type"] == "audio"}


@pytest.mark.timeout(120)
async def test_viewer_plays_every_voice_with_its_video_through_a_gap(
    talking_viewer: Viewing,
) -> None:
    """Three speakers with webcams, and a listener who only speaks: each voice plays in its
    participant's tile on the master clock, 101's across the gap in their audio (two
    segments), the listener's in a tile of its own; Mute and Solo choose who is heard."""
    await talk(talking_viewer.archived)
    sim = talking_viewer.simulations[0]
    assert sim.wallclock_start is not None
    listener = meeting_audio({LISTENER: speaker(LISTENER, 3.0)}, SPOKEN_FROM_S + 1.0, 0.0)
    await send_audio(
        talking_viewer.ws_url, sim.bot_id, sim.recording_id, listener, sim.wallclock_start
    )
    await talking_viewer.settle()
    assert talking_viewer.root is not None
    folder = talking_viewer.root / sim.bot_id / sim.recording_id / "participants"
    audio = {
        pid: orjson.loads((folder / str(pid) / "audio/flac/manifest.json").read_bytes())
        for pid in (*SPEAKERS, LISTENER)
    }
    gapped = audio[101]["segments"]
    gap = next(i for i in range(1, len(gapped)) if gapped[i]["start"] > gapped[i - 1]["end"] + 0.5)
    assert gapped[gap - 1]["end"] <= SILENT_S[0] + 0.1 < SILENT_S[1] <= gapped[gap]["start"]

    async def listen(page: Page) -> None:
        tiles = await page.evaluate(
            """[...document.querySelectorAll("figure")].map((f) => ({
              participant: f.dataset.participant, type: f.dataset.type,
              voice: f.classList.contains("voice"), audio: f.querySelectorAll("audio").length,
            }))"""
        )
        speakers = [str(p) for p in SPEAKERS]
        assert sorted(
            (t["participant"], t["type"], t["voice"], t["audio"]) for t in tiles
        ) == sorted(
            [*((p, "webcam", False, 1) for p in speakers), (str(LISTENER), "audio", True, 1)]
        )
        everyone = [*speakers, str(LISTENER)]
        assert await _muted(page) == dict.fromkeys(everyone, False)
        await page.click(f'button[data-listen="solo"][data-participant="{SPEAKERS[0]}"]')
        assert await _muted(page) == {p: p != speakers[0] for p in everyone}
        await page.click(f'button[data-listen="solo"][data-participant="{SPEAKERS[0]}"]')
        await page.click(f'button[data-listen="mute"][data-participant="{SPEAKERS[2]}"]')
        assert await _muted(page) == {p: p == speakers[2] for p in everyone}

    report, console = await play_to_the_end(talking_viewer, listen)
    assert report["finished"], report
    assert not console, console
    by_stream = {(s["participant_id"], s["type"]): s for s in report["streams"]}
    assert len(by_stream) == len(SPEAKERS) * 2 + 1, sorted(by_stream)
    for (pid, kind), stream in by_stream.items():
        name = f"{pid} {kind}"
        assert not stream["errors"], (name, stream["errors"])
        assert stream["media_error"] is None, name
        assert stream["ended"], (name, stream)
        assert stream["max_drift"] < SYNC_S, (name, stream["max_drift"])
        if kind != "audio":
            continue
        segments = audio[int(pid)]["segments"]
        # Playlist positions: the segments' durations added up (the gap is not in them).
        total = sum(s["end"] - s["start"] for s in segments)
        assert stream["max_time"] == pytest.approx(total, abs=0.15), (name, stream, total)
        assert stream["samples"] > 20, (name, stream["samples"])
