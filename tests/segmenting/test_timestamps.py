"""The timestamp guard: outliers dropped, legitimate jumps kept, a wrong start outvoted, a
wrong first frame never trusted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.errors import MediaError
from archiver.segmenting.timestamps import HOLD_FRAMES, REANCHOR_FRAMES, Timed, TimestampGuard

START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def at(relative_s: float, skew_s: float = 0.0) -> tuple[float, datetime]:
    return relative_s, START + timedelta(seconds=relative_s + skew_s)


def guard() -> TimestampGuard[int]:
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


def admit_all(
    checking: TimestampGuard[int], frames: list[tuple[float, datetime]]
) -> list[Timed[int]]:
    """Every frame through `admit` (numbered in order), then what is still held."""
    judged = [out for n, frame in enumerate(frames) for out in checking.admit(n, *frame)]
    return judged + checking.release()


def test_a_first_frame_is_held_until_the_next_agrees_with_it() -> None:
    checking = guard()
    assert checking.admit(0, *at(0.0)) == []
    assert checking.held_frames == 1
    assert checking.admit(1, *at(1 / 30)) == [
        Timed(0, 0.0, at(0.0)[1]),
        Timed(1, 1 / 30, at(1 / 30)[1]),
    ]
    assert checking.held_frames == 0
    assert checking.admit(2, *at(2 / 30)) == [Timed(2, 2 / 30, at(2 / 30)[1])]


def test_a_first_frame_with_a_wild_relative_is_dropped_and_the_rest_keep_their_times() -> None:
    checking = guard()
    frames = [(5e5, at(0.0)[1])]  # days off, yet within range
    frames += [at(n / 30) for n in range(1, 10)]
    judged = admit_all(checking, frames)
    assert [j.item for j in judged] == list(range(10))
    error = judged[0].error
    assert error is not None
    assert error.reason == "timestamp"
    assert [(j.relative_s, j.absolute) for j in judged[1:]] == frames[1:]
    assert all(j.error is None for j in judged[1:])


def test_a_first_frame_with_a_wrong_absolute_is_kept_with_its_wall_clock_rebuilt() -> None:
    checking = guard()
    frames = [(0.0, datetime(1969, 7, 20, 20, 17, tzinfo=UTC))] + [at(n / 30) for n in range(1, 10)]
    judged = admit_all(checking, frames)
    assert [(j.relative_s, j.absolute, j.error) for j in judged] == [
        (*at(n / 30), None) for n in range(10)
    ]
    assert checking.absolute_repaired == 1


def test_a_bad_second_frame_costs_only_itself() -> None:
    checking = guard()
    frames = [at(0.0), (5e5, at(1 / 30)[1])] + [at(n / 30) for n in range(2, 6)]
    judged = admit_all(checking, frames)
    assert [j.item for j in judged if j.error is not None] == [1]
    assert [(j.relative_s, j.absolute) for j in judged if j.error is None] == [
        at(n / 30) for n in (0, 2, 3, 4, 5)
    ]


def test_a_stream_of_one_frame_is_released_at_its_end() -> None:
    checking = guard()
    assert checking.admit(0, *at(3.0)) == []
    assert checking.release() == [Timed(0, 3.0, at(3.0)[1])]
    assert checking.held_frames == 0


def test_with_every_absolute_wrong_the_hold_is_bounded_and_relative_is_kept() -> None:
    """No two frames ever agree on the start: the first held frame sets it, as it always
    did, and the frames after it are repaired, not lost."""
    checking = guard()
    frames = [(n / 30, START + timedelta(hours=n + 1)) for n in range(HOLD_FRAMES + 3)]
    judged = []
    for n, frame in enumerate(frames):
        judged += checking.admit(n, *frame)
        assert checking.held_frames < HOLD_FRAMES
    assert [j.relative_s for j in judged if j.error is None] == [f[0] for f in frames]


def test_a_relative_out_of_range_is_refused_at_once_not_held() -> None:
    checking = guard()
    with pytest.raises(MediaError):
        checking.admit(0, 1e300, START)
    assert checking.held_frames == 0


@settings(max_examples=200, deadline=None)
@given(
    bad_at=st.integers(min_value=0, max_value=HOLD_FRAMES - 2),
    relative_off=st.booleans(),
    off_s=st.floats(min_value=10.0, max_value=5e5),
    count=st.integers(min_value=HOLD_FRAMES, max_value=40),
)
def test_one_bad_frame_among_the_first_never_moves_a_good_one(
    bad_at: int, relative_off: bool, off_s: float, count: int
) -> None:
    """Whichever of the first frames is bad and whichever clock is wrong, every frame comes
    out once, in order; every good frame at its exact times; the bad one dropped (its
    relative jumped) or kept at its own relative with the stream's wall clock."""
    checking = guard()
    frames = [at(n / 30) for n in range(count)]
    relative, absolute = frames[bad_at]
    frames[bad_at] = (
        (relative + off_s, absolute)
        if relative_off
        else (relative, absolute + timedelta(seconds=off_s))
    )
    judged = admit_all(checking, frames)
    assert [j.item for j in judged] == list(range(count))
    assert checking.held_frames == 0
    for n, j in enumerate(judged):
        if n != bad_at:
            assert (j.relative_s, j.absolute, j.error) == (*frames[n], None)
    bad = judged[bad_at]
    if relative_off:
        assert bad.error is not None
    else:
        assert (bad.relative_s, bad.error) == (frames[bad_at][0], None)
        assert abs(bad.absolute - at(bad_at / 30)[1]) <= timedelta(microseconds=1)
