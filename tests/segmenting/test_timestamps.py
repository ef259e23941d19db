"""The timestamp guard: outliers dropped, legitimate jumps kept, a wrong start outvoted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from archiver.errors import MediaError
from archiver.segmenting.timestamps import REANCHOR_FRAMES, TimestampGuard

START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def at(relative_s: float, skew_s: float = 0.0) -> tuple[float, datetime]:
    return relative_s, START + timedelta(seconds=relative_s + skew_s)


def guard() -> TimestampGuard:
    return TimestampGuard(tolerance_s=2.0, max_relative_s=7 * 86400)


def test_frames_whose_clocks_agree_pass_unchanged() -> None:
    checking = guard()
    for n in range(30):
        relative, absolute = at(n / 30, skew_s=0.01 * (n % 3))
        assert checking.check(relative, absolute) == absolute


@pytest.mark.parametrize("relative", [1e300, 1e12, -5.0, float("inf"), float("nan")])
def test_a_relative_time_out_of_range_is_refused(relative: float) -> None:
    with pytest.raises(MediaError) as refused:
        guard().check(relative, START)
    assert refused.value.reason == "timestamp"


def test_a_jumped_relative_with_a_correct_absolute_is_dropped_and_the_next_frame_is_exact() -> None:
    checking = guard()
    checking.check(*at(1.0))
    with pytest.raises(MediaError):
        checking.check(5000.0, at(1.1)[1])
    assert checking.check(*at(1.2)) == at(1.2)[1]


def test_a_camera_off_for_ten_minutes_is_a_legitimate_jump() -> None:
    checking = guard()
    checking.check(*at(1.0))
    assert checking.check(*at(601.0)) == at(601.0)[1]


def test_a_wrong_absolute_is_rebuilt_from_the_stream_start() -> None:
    checking = guard()
    checking.check(*at(1.0))
    repaired = checking.check(1.1, datetime(1970, 1, 1, tzinfo=UTC))
    assert repaired == at(1.1)[1]
    assert checking.absolute_repaired == 1


def test_a_naive_absolute_is_read_as_utc() -> None:
    checking = guard()
    naive = at(1.0)[1].replace(tzinfo=None)
    assert checking.check(1.0, naive) == at(1.0)[1]


def test_a_wrong_first_frame_is_outvoted_by_the_frames_after_it() -> None:
    checking = guard()
    checking.check(40_000.0, at(1.0)[1])  # the first frame's relative is off by hours
    for n in range(1, REANCHOR_FRAMES):
        with pytest.raises(MediaError):
            checking.check(*at(1.0 + n / 10))
    assert checking.check(*at(1.0 + REANCHOR_FRAMES / 10)) == at(1.0 + REANCHOR_FRAMES / 10)[1]
    assert checking.reanchors == 1
    assert checking.check(*at(2.0)) == at(2.0)[1]


def test_a_resumed_stream_knows_its_start_before_its_first_frame() -> None:
    checking = guard()
    checking.seed(START.timestamp(), 10.0)
    with pytest.raises(MediaError):
        checking.check(1e6, at(10.1)[1])
    assert checking.check(*at(10.1)) == at(10.1)[1]
