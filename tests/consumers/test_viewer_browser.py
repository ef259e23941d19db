"""The viewer in a real browser: headless Chromium (Debian's `chromium` package, which CI
installs) plays an archived meeting through hls.js, served by the real service.

Not skipped when Chromium is missing: CI installs it, and a viewer nobody played is not
tested.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.consumers.conftest import Viewing

CHROMIUM = "/usr/bin/chromium"
SYNC_S = 0.1


async def play_to_the_end(viewing: Viewing) -> tuple[dict[str, Any], list[str]]:
    """Open the viewer, press play, wait for the end; the page's report and what the
    browser logged as errors."""
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
            await page.click("#play")
            deadline = time.monotonic() + 25
            report: dict[str, Any] = await page.evaluate("window.viewer.report()")
            while not report["finished"] and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                report = await page.evaluate("window.viewer.report()")
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
