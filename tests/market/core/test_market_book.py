"""The book: open entries per slot, cancel own only, idempotent client ids."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.core.book import Book, Entry, ask_order, bid_order, tie_key
from market.core.errors import MarketError
from market.core.protocol import Side
from tests.market.builders import entry

S1 = (120, 180)
S2 = (180, 240)


def e(
    participant: str,
    uuid: str,
    side: Side = "bid",
    slot: tuple[int, int] = S1,
    id: str | None = None,
    quantity: int = 100,
    price: float = 0.1,
    source: str | None = None,
) -> Entry:
    return entry(participant, quantity, price, source, side=side, uuid=uuid, slot=slot, id=id)


def test_add_get_and_pop_in_submission_order() -> None:
    book = Book()
    entries = [e("A", "A.0"), e("B", "B.0", "ask", source="solar"), e("C", "C.0"), e("A", "A.1", slot=S2)]
    for x in entries:
        book.add(x)
    assert len(book) == 4
    assert book.get("B.0") == entries[1]
    assert book.get("nope") is None
    assert book.slots_until(179) == [120]
    assert book.slots_until(180) == [120, 180]
    assert book.entries() == [entries[0], entries[2], entries[1], entries[3]]
    bids, asks = book.pop_slot(120)
    assert bids == [entries[0], entries[2]] and asks == [entries[1]]
    assert len(book) == 1 and book.get("A.0") is None
    assert book.pop_slot(120) == ([], [])
    assert book.slots_until(10**9) == [180]


def test_cancel_own_only() -> None:
    book = Book()
    mine = e("A", "A.0")
    book.add(mine)
    with pytest.raises(MarketError) as info:
        book.cancel("B", "A.0")
    assert info.value.code == "not_found"
    assert book.get("A.0") == mine  # unchanged
    assert book.cancel("A", "A.0") == mine
    assert book.get("A.0") is None and len(book) == 0
    with pytest.raises(MarketError) as info:
        book.cancel("A", "A.0")
    assert info.value.code == "not_found"
    assert book.pop_slot(120) == ([], [])


def test_cancel_unknown_and_foreign_look_the_same() -> None:
    book = Book()
    book.add(e("A", "A.0"))
    msgs = []
    for who, uuid in (("B", "A.0"), ("B", "zz")):
        with pytest.raises(MarketError) as info:
            book.cancel(who, uuid)
        msgs.append(info.value.message.replace(uuid, "?"))
    assert msgs[0] == msgs[1]


def test_client_id_same_content_is_a_duplicate_of_the_first() -> None:
    book = Book()
    first = e("A", "A.0", id="x")
    book.add(first)
    again = e("A", "A.1", id="x")
    assert book.find_duplicate(again) == first
    assert book.find_duplicate(e("A", "A.2")) is None  # no client id
    assert book.find_duplicate(e("B", "B.0", id="x")) is None  # ids are per participant
    assert book.find_duplicate(e("A", "A.3", id="y")) is None


@pytest.mark.parametrize(
    "change",
    [{"quantity": 101}, {"price": 0.11}, {"side": "ask", "source": "solar"}, {"slot": S2}, {"source": "solar"}],
)
def test_client_id_other_content_is_a_conflict(change: dict[str, Any]) -> None:
    book = Book()
    book.add(e("A", "A.0", id="x"))
    with pytest.raises(MarketError) as info:
        book.find_duplicate(e("A", "A.1", id="x", **change))
    assert info.value.code == "conflict"


def test_pop_slot_frees_client_ids_of_that_slot_only() -> None:
    book = Book()
    book.add(e("A", "A.0", id="x"))
    book.add(e("A", "A.1", id="y", slot=S2))
    book.pop_slot(120)
    assert book.find_duplicate(e("A", "A.2", id="x", quantity=5)) is None
    with pytest.raises(MarketError):
        book.find_duplicate(e("A", "A.3", id="y", quantity=5, slot=S2))


def test_clear() -> None:
    book = Book()
    book.add(e("A", "A.0", id="x"))
    book.clear()
    assert len(book) == 0 and book.entries() == [] and book.find_duplicate(e("A", "A.1", id="x", quantity=3)) is None


def test_entry_reply_and_content() -> None:
    x = entry("A", 100, 0.1, "solar", side="ask", uuid="A.0", id="c1", time_submission=60)
    assert x.reply() == {
        "uuid": "A.0",
        "id": "c1",
        "side": "ask",
        "quantity": 100,
        "price": 0.1,
        "time_delivery": [0, 60],
        "source": "solar",
        "time_submission": 60,
    }
    assert x.content() == ("ask", 100, 0.1, (0, 60), "solar")


def test_tie_key_is_stable_across_processes() -> None:
    # blake2b, not hash(): the same uuid ties the same way in every process.
    assert tie_key("P1.0") == tie_key("P1.0")
    assert tie_key("P1.0") != tie_key("P1.1")
    assert tie_key("P1.0") == 2351829774998634230
    assert 0 <= tie_key("anything") < 2**64


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["bid", "ask"]),
            st.sampled_from([0.1, 0.125, 0.2, 0.3]),
            st.sampled_from([0, 60, 120]),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_pop_slot_gives_each_side_in_clearing_order_after_adds_and_cancels(
    ops: list[tuple[str, float, int, bool]],
) -> None:
    """The book keeps each side ranked as entries arrive (clearing does not sort): what it
    hands over equals sorting the surviving entries by bid_order / ask_order."""
    book = Book()
    alive: dict[str, Entry] = {}
    for n, (side, price, t, cancel) in enumerate(ops):
        uuid = f"P{n % 3}.{n}"
        e = Entry(uuid, None, f"P{n % 3}", side, 10, price, (900, 960), "solar", t, tie_key(uuid))  # type: ignore[arg-type]
        book.add(e)
        alive[uuid] = e
        if cancel and n % 2:
            victim = sorted(alive)[len(alive) // 2]
            book.cancel(alive[victim].participant, victim)
            del alive[victim]
    bids, asks = book.pop_slot(900)
    assert bids == sorted((e for e in alive.values() if e.side == "bid"), key=bid_order)
    assert asks == sorted((e for e in alive.values() if e.side == "ask"), key=ask_order)
