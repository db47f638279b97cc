"""A batch of orders or readings booked at once (`Market._enter_all`, `_meter_all`) is what
the loop over its items gives (`_enter_each`, `_meter` of each): the same replies and
refusals, entries and uuids, book (ranked order, open counts, client ids), journal and the
behaviour after. Random batches (hypothesis), clean ones (booked at once) and ones with
items that are refused or repeated (the whole batch falls back to the loop)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.core import engine
from market.core.engine import Market
from market.core.errors import MarketError
from market.core.protocol import EntryMsg, MeterMsg, Side
from tests.market.builders import market, meter

D = 60
NEXT = (2 * D, 3 * D)  # next_settle of the round at 0 (close_steps 2)
PARTIES = ["A", "B", "C", "D", "E", "F", "G", "H"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _market() -> Market:
    # Caps that a batch reaches now and then (it then goes to the loop, which refuses past them).
    m = market(max_open_per_slot=8, max_open_total=12, max_quantity=500, price_min=0.0, price_max=1.0)
    m.open_round(0)
    return m


def _item(clean: bool) -> st.SearchStrategy[tuple[str, Side, EntryMsg]]:
    """An order; `clean`: one the market accepts unless caps or client ids say otherwise."""
    quantity = st.integers(1, 500) if clean else st.integers(1, 520)
    # Few distinct prices: equal keys, whose order the batch must keep as the loop does.
    price = st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0] if clean else [-0.1, 0.25, 0.5, 1.0, 1.5])
    source = st.sampled_from(["solar", "bess", "wind"] if clean else [None, "solar", "coal"])
    slot = st.just(NEXT) if clean else st.sampled_from([NEXT, NEXT, (0, D), (3 * D, 4 * D), (130, 190)])
    # Clean: client ids mostly new (a repeat sends the batch to the loop); else often repeated.
    ids = st.none() | st.sampled_from([f"x{i}" for i in range(200 if clean else 4)])
    return st.tuples(st.sampled_from(PARTIES), st.sampled_from(["bid", "ask"]), quantity, price, source, slot, ids).map(
        lambda t: (t[0], t[1], EntryMsg(t[2], t[3], t[5], t[6], t[4]))
    )


def _batch() -> st.SearchStrategy[list[tuple[str, Side, EntryMsg]]]:
    """Small batches (the loop) and ones at or past `BATCH_FROM`, clean or not."""
    sizes = st.sampled_from([(0, 6), (engine.BATCH_FROM, 30)])
    return st.tuples(st.booleans(), sizes).flatmap(lambda t: st.lists(_item(t[0]), min_size=t[1][0], max_size=t[1][1]))


def _replies(results: list[Any]) -> list[Any]:
    return [(r.code, r.message) if isinstance(r, MarketError) else r for r in results]


def _book(m: Market) -> Any:
    """The book as everything after sees it: entries, counts, client ids, and each slot's
    sides in the order the clearing takes them."""
    b = copy.deepcopy(m.book)
    slots = {s: b.pop_slot(s) for s in b.slots_until(10**9)}
    counts = {p: m.book.open_count(p, s) for p in PARTIES for s in slots}
    return m.book.entries(), counts, sorted(m.book._client.items()), slots, m._counters


@SETTINGS
@given(before=_batch(), batch=_batch(), after=_batch())
def test_a_batch_of_orders_books_as_the_loop_over_its_items(
    before: list[tuple[str, Side, EntryMsg]],
    batch: list[tuple[str, Side, EntryMsg]],
    after: list[tuple[str, Side, EntryMsg]],
) -> None:
    at_once, looped = _market(), _market()
    for m in (at_once, looped):
        m._enter_each(before, m._require_round())
    got = _replies(at_once.submit_each(batch))
    expected = _replies(looped._enter_each(batch, looped._require_round()))
    assert got == expected
    assert _book(at_once) == _book(looped)
    assert at_once.take_journal() == looped.take_journal()
    # What follows (repeated ids, caps) sees the same book.
    assert _replies(at_once.submit_each(after)) == _replies(looped._enter_each(after, looped._require_round()))
    assert _book(at_once) == _book(looped)


def test_a_clean_batch_is_booked_at_once_and_a_refused_item_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch path is taken for a clean batch (not only its fallback), and one refused
    item anywhere sends the whole batch to the loop, which names it."""
    calls: list[int] = []
    loop = Market._enter_each

    def counted(self: Market, items: Any, r: Any) -> Any:
        calls.append(len(items))
        return loop(self, items, r)

    monkeypatch.setattr(Market, "_enter_each", counted)
    m = _market()
    clean = [(p, "bid", EntryMsg(10, 0.5, NEXT, None, None)) for p in PARTIES * 2]
    assert len(clean) >= engine.BATCH_FROM
    results = m.submit_each(clean)
    assert calls == [] and all(not isinstance(r, MarketError) and not r[1] for r in results)
    uuids = [r[0].uuid for r in results[: len(PARTIES) + 1]]
    assert uuids == [f"{NEXT[0]}.{p}.0" for p in PARTIES] + [f"{NEXT[0]}.A.1"]
    bad = [*clean[:10], ("A", "bid", EntryMsg(10, 5.0, NEXT, None, None)), *clean[10:]]
    replies = m.submit_each(bad)
    assert calls == [len(bad)]
    assert isinstance(replies[10], MarketError) and replies[10].message == "price outside [0.0, 1.0]"


def _reading(p: str, k: int, slot: tuple[int, int] = (0, D)) -> tuple[str, MeterMsg]:
    return p, meter(gen={"solar": k} if k % 3 else {}, other={"external": k % 7}, slot=slot)


READERS = [f"P{i}" for i in range(24)]


@SETTINGS
@given(
    first=st.lists(st.sampled_from(READERS), max_size=2, unique=True),
    readers=st.sampled_from([(0, 5), (engine.BATCH_FROM, len(READERS))]).flatmap(
        lambda n: st.lists(st.sampled_from(READERS), min_size=n[0], max_size=n[1], unique=True)
    ),
    values=st.lists(st.integers(0, 40), min_size=len(READERS), max_size=len(READERS)),
    odd=st.sampled_from([None] * 5 + [(D, 2 * D), (30, 90), (-D, 0), "repeat", "conflict"]),
    at=st.integers(0, 39),
)
def test_a_batch_of_readings_is_stored_as_the_loop_over_its_items(
    first: list[str], readers: list[str], values: list[int], odd: tuple[int, int] | str | None, at: int
) -> None:
    batch = [_reading(p, k) for p, k in zip(readers, values, strict=False)]
    if odd is not None and batch:  # a reading of another interval, or a repeat, somewhere
        who = batch[at % len(batch)][0]
        extra = _reading(who, 1, odd) if isinstance(odd, tuple) else _reading(who, 2 if odd == "conflict" else 1)
        if isinstance(odd, tuple):
            batch[at % len(batch)] = extra
        else:
            batch.insert(at % (len(batch) + 1), extra)
    at_once, looped = _market(), _market()
    for m in (at_once, looped):
        m.meter_each([_reading(p, 5) for p in first])
    sources = (["solar", "bess", "wind"], ["solar", "bess", "wind"], ["solar", "bess", "wind", "external"])
    got = _replies(at_once.meter_each(batch, sources=sources))
    expected = []
    for p, msg in batch:
        try:
            expected.append(looped.meter(p, msg))
        except MarketError as err:
            expected.append((err.code, err.message))
    assert got == expected
    assert at_once.take_journal() == looped.take_journal()
    assert at_once._delivering[0].meters == looped._delivering[0].meters
    assert at_once._delivering[0].records == looped._delivering[0].records
    assert at_once.process(0, now=D) == looped.process(0, now=D)
