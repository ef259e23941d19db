"""PNG batches are bounded in bytes as well as frames and seconds."""

from __future__ import annotations

from datetime import UTC, datetime

from archiver.segmenting.png import PngBatch, PngBatcher
from archiver.tools.simulator import SimulatedStream, encode_png_stream

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_batch_closes_once_its_frames_reach_the_byte_budget() -> None:
    plan = SimulatedStream(100, "webcam", [(0.0, (320, 180))], "png")
    images = [data for _, data, _ in encode_png_stream(plan, 5, 2.0)]
    limit = 3 * max(len(image) for image in images)
    batcher = PngBatcher(max_frames=60, max_s=30.0, max_bytes=limit)
    batches: list[PngBatch] = []
    for n, image in enumerate(images):
        batches += batcher.push(image, n / 2, NOW)
    batches += batcher.flush()
    assert [frame.size for batch in batches for frame in batch.frames] == [len(i) for i in images]
    assert len(batches) > 1
    for batch in batches[:-1]:
        sizes = [frame.size for frame in batch.frames]
        # Closed by the frame that reached the budget, not one frame earlier or later.
        assert sum(sizes) >= limit > sum(sizes[:-1]), sizes
    assert sum(frame.size for frame in batches[-1].frames) > 0
