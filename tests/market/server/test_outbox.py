"""The outbox that serves `resume` (market/server/outbox.py): numbered per participant, and
bounded per participant and in all (docs/reliability.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_an_event_the_participant_bound_dropped_is_skipped_by_the_budget() -> None:
    """A's first event goes when its second comes (keep 1), which puts the outbox over its
    budget: the oldest event still kept, B's, goes, not A's newest in the place of its first."""
    fill, delivery = SettledRef(FILL, "ask"), DeliveryRef(SLOT, ROWS, (0,))
    assert kept_bytes(fill) < kept_bytes(delivery) <= 2 * kept_bytes(fill)
    box = Outbox(keep=1, budget=2 * kept_bytes(fill))
    box.push_refs([("A", fill)])
    box.push_refs([("B", fill)])
    box.push_refs([("A", delivery)])
    assert box.since("A", 1)[0] == [{"event": "delivery", "data": {**delivery.payload(), "seq": 2}}]
    assert box.bytes == kept_bytes(delivery)
    with pytest.raises(LookupError):
        box.since("B", 0)


def test_what_the_outbox_remembers_of_its_order_stays_bounded() -> None:
    """The per-participant bound drops events the budget's order still lists: those entries
    are forgotten too, so the order never outgrows twice the events kept (plus a margin)."""
    box = Outbox(keep=2)
    for _ in range(20_000):
        box.push_refs([("A", SettledRef(FILL, "ask"))])
        assert len(box._order_pid) <= 2 * 2 + 1024
    assert seqs(box.since("A", 19_998)[0]) == [19_999, 20_000]


@settings(max_examples=200, deadline=None)
@given(
    keep=st.integers(1, 6),
    budget=st.integers(0, 4000),
    pushes=st.lists(
        st.tuples(st.sampled_from("ABC"), st.sampled_from(["bytes", "settled", "delivery"]), st.integers(0, 400)),
        max_size=80,
    ),
)
def test_the_outbox_keeps_a_suffix_of_each_participant_s_events_within_both_bounds(
    keep: int, budget: int, pushes: list[tuple[str, str, int]]
) -> None:
    """Whatever is pushed: each participant's kept events are the last ones it was sent, in
    order, at most `keep`; the estimate adds up to what is kept and stays within the budget;
    `resume` from before the oldest kept one is refused, from any later seq it is exact; and
    the budget dropped the oldest events of the whole outbox first."""
    box = Outbox(keep=keep, budget=budget)
    sent: dict[str, list[dict[str, object]]] = {p: [] for p in "ABC"}
    pushed: list[tuple[str, int]] = []  # (participant, its seq), in push order
    for pid, kind, size in pushes:
        pushed.append((pid, len(sent[pid]) + 1))
        if kind == "bytes":
            numbered = box.push(pid, "delivery", {"pad": "x" * size})
            sent[pid].append({"event": "delivery", "data": numbered})
        else:
            ref: SettledRef | DeliveryRef
            if kind == "settled":
                ref = SettledRef(FILL, "ask")
                (seq,) = box.push_refs([(pid, ref)])
            else:
                ref = DeliveryRef(SLOT, ROWS, (0,) * (1 + size % 3))
                (seq,) = box.push_refs([(pid, ref)])
            sent[pid].append({"event": ref.EVENT, "data": {**ref.payload(), "seq": seq}})
    assert box.bytes <= max(box.budget, 0)
    kept_total = 0
    for pid, events in sent.items():
        n = len(events)
        kept = 0
        while kept < n:  # how many of its last events resume still serves
            try:
                box.since(pid, n - kept - 1)
            except LookupError:
                break
            kept += 1
        assert kept <= keep
        page, more = box.since(pid, n - kept)
        assert page == events[n - kept :] and not more  # exactly the last `kept`, in order
        if kept < n:
            with pytest.raises(LookupError):
                box.since(pid, n - kept - 1)
        kept_total += kept
    # Of the events each participant's own bound kept, the budget dropped the oldest first.
    kept_of = {p: len(sent[p]) - len(box._sent.get(p, ())) for p in sent}  # seqs up to this are gone
    own = [(p, q) for p, q in pushed if q > len(sent[p]) - keep]
    survived = [q > kept_of[p] for p, q in own]
    assert survived == sorted(survived)  # gone ones first, then only kept ones
    assert box._live == kept_total
    assert box.bytes == sum(kept_bytes(d) for b in box._sent.values() for _, _, d in b)  # the estimate adds up
    assert len(box._order_pid) <= 2 * kept_total + 1024
