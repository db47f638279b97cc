"""Round and slot arithmetic (PROTOCOL.md section Time)."""

from __future__ import annotations

import pytest

from market.core.timing import SimClock, align_down, is_aligned, round_times


def test_close_steps_2_default_layout() -> None:
    r = round_times(600, 60, 2)
    assert r.time == 600 and r.duration == 60
    assert r.current_round == (600, 660)
    assert r.last_round == (540, 600)
    assert r.next_settle == (720, 780)
    assert r.last_settle == (660, 720)


def test_close_steps_1_matches_the_current_round() -> None:
    r = round_times(600, 60, 1)
    assert r.current_round == (600, 660)
    assert r.last_settle == (600, 660) == r.current_round
    assert r.next_settle == (660, 720)


def test_close_steps_16() -> None:
    d = 900
    r = round_times(3600, d, 16)
    assert r.current_round == (3600, 4500)
    assert r.last_settle == (3600 + 15 * d, 3600 + 16 * d)
    assert r.next_settle == (3600 + 16 * d, 3600 + 17 * d)
    assert r.last_round == (2700, 3600)


@pytest.mark.parametrize("c", [1, 2, 3, 16])
@pytest.mark.parametrize("d", [1, 60, 900, 3600])
def test_layout_invariants(c: int, d: int) -> None:
    t = 7 * 86400
    r = round_times(t, d, c)
    for slot in (r.current_round, r.last_round, r.next_settle, r.last_settle):
        assert is_aligned(slot, d)
    # last_settle is the slot just before next_settle; the gate of next round's last_settle is this next_settle.
    assert r.last_settle[1] == r.next_settle[0]
    assert round_times(t + d, d, c).last_settle == r.next_settle
    assert r.last_settle[0] - r.current_round[0] == (c - 1) * d


def test_last_round_given() -> None:
    # After a jump (sim step of more than one duration), last_round is the previous current_round.
    assert round_times(600, 60, 2, last_round=(300, 360)).last_round == (300, 360)


@pytest.mark.parametrize(
    ("interval", "d", "expected"),
    [
        ((0, 60), 60, True),
        ((120, 180), 60, True),
        ((30, 90), 60, False),
        ((0, 120), 60, False),
        ((60, 0), 60, False),
        ((60, 60), 60, False),
        ((900, 1800), 900, True),
        ((1800, 2700), 900, True),
        ((600, 1500), 900, False),
    ],
)
def test_is_aligned(interval: tuple[int, int], d: int, expected: bool) -> None:
    assert is_aligned(interval, d) is expected


def test_align_down() -> None:
    assert align_down(0, 60) == 0
    assert align_down(59, 60) == 0
    assert align_down(60, 60) == 60
    assert align_down(1_700_000_123, 900) == 1_700_000_100


def test_sim_clock() -> None:
    clock = SimClock()
    assert clock.now() == 0
    clock.set(120)
    assert clock.now() == 120
