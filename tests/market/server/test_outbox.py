"""The outbox that serves `resume` (market/server/outbox.py): numbered per participant, and
bounded per participant and in all (docs/reliability.md)."""

from __future__ import annotations

import pytest

from market.core.fleet_results import DeliveryRef, SettledRef
from market.core.records import Settlement, Transaction
from market.server.outbox import Outbox, kept_bytes

SLOT = (900, 1800)
FILL = Settlement(
    "c900-0", *SLOT, "A", "B", "a0", "b0", None, "my0", "solar", 10, 0.2, 0.1, 2000, 1000, False, 0, 0,
)  # fmt: skip
ROWS = (Transaction("t0", "p2p", *SLOT, "A", "B", "solar", 10, 0.2, 0.1, 2000, 1000, None, 0),)


def seqs(page: list[dict[str, object]]) -> list[object]:
    return [e["data"]["seq"] for e in page]  # type: ignore[index]


def test_events_are_numbered_per_participant_and_resumed_in_order() -> None:
    box = Outbox()
    assert box.push("A", "delivery", {"x": 1})["seq"] == 1
    assert box.push_refs([("A", SettledRef(FILL, "ask")), ("B", SettledRef(FILL, "bid"))]) == [2, 1]
    assert box.push_refs([("A", DeliveryRef(SLOT, ROWS, (0,)))]) == [3]
    page, more = box.since("A", 0)
    assert [e["event"] for e in page] == ["delivery", "settled", "delivery"] and seqs(page) == [1, 2, 3] and not more
    assert page[1]["data"] == {**SettledRef(FILL, "ask").payload(), "seq": 2}
    page, more = box.since("A", 1, limit=1)
    assert seqs(page) == [2] and more


def test_each_participant_keeps_its_last_events_only() -> None:
    box = Outbox(keep=3)
    for i in range(5):
        box.push("A", "delivery", {"i": i})
    assert seqs(box.since("A", 2)[0]) == [3, 4, 5]
    with pytest.raises(LookupError):
        box.since("A", 1)  # 2 is no longer kept
    assert box.bytes == 3 * kept_bytes(b'{"i":4,"seq":5}')


def test_the_whole_outbox_stays_within_its_budget_dropping_the_oldest_first() -> None:
    one = kept_bytes(DeliveryRef(SLOT, ROWS, (0,)))
    box = Outbox(budget=10 * one)
    for _ in range(4):  # rounds: a delivery for each of 5 participants
        box.push_refs([(p, DeliveryRef(SLOT, ROWS, (0,))) for p in "ABCDE"])
    assert box.bytes <= box.budget and box.bytes == 10 * one
    for p in "ABCDE":  # the two oldest rounds are gone: resume says so, the last two are kept
        with pytest.raises(LookupError):
            box.since(p, 0)
        assert seqs(box.since(p, 2)[0]) == [3, 4]
    box.push("F", "settled", {"big": "x" * 20 * one})  # larger than the budget: nothing else is kept
    assert box.bytes == 0 and box.since("F", 1)[0] == []
    with pytest.raises(LookupError):
        box.since("A", 3)


def test_what_the_outbox_remembers_of_its_order_stays_bounded() -> None:
    """The per-participant bound drops events the budget's order still lists: those entries
    are forgotten too, so the order never outgrows twice the events kept (plus a margin)."""
    box = Outbox(keep=2)
    for _ in range(20_000):
        box.push_refs([("A", SettledRef(FILL, "ask"))])
        assert len(box._order_pid) <= 2 * 2 + 1024
    assert seqs(box.since("A", 19_998)[0]) == [19_999, 20_000]
