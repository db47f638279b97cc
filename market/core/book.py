"""Open bids and asks per delivery slot, with idempotent client ids.

The book never decides whether an entry is acceptable (the engine validates first); it
stores, cancels and hands a slot's entries to the clearing when the slot's gate closes.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from typing import Any

import msgspec

from market.core.errors import MarketError
from market.core.protocol import Side
from market.core.timing import Slot


def tie_key(uuid: str) -> int:
    """Order of entries submitted in the same second: a hash of the uuid, so that it does
    not depend on network races and the same scenario clears the same way every run."""
    return int.from_bytes(_blake2b(uuid.encode(), digest_size=8).digest())  # big-endian (the default)


_blake2b = hashlib.blake2b


class Entry(msgspec.Struct, frozen=True, gc=False):
    """An open bid or ask. `gc=False`: its fields are strings, numbers and a tuple of ints,
    so it can be in no reference cycle; big books then cost the garbage collector nothing."""

    uuid: str
    id: str | None  # the client's own id, if it sent one
    participant: str
    side: Side
    quantity: int
    price: float
    time_delivery: Slot
    source: str | None
    time_submission: int
    tie: int

    def reply(self) -> dict[str, Any]:
        """The `entry` object of PROTOCOL.md replies."""
        return {
            "uuid": self.uuid,
            "id": self.id,
            "side": self.side,
            "quantity": self.quantity,
            "price": self.price,
            "time_delivery": list(self.time_delivery),
            "source": self.source,
            "time_submission": self.time_submission,
        }

    def content(self) -> tuple[object, ...]:
        """What a client id stands for: a resubmission must repeat exactly this."""
        return (self.side, self.quantity, self.price, self.time_delivery, self.source)


def bid_order(e: Entry) -> tuple[float, int, int]:
    """Price-time priority of bids: highest price first, then earliest, then tie key."""
    return (-e.price, e.time_submission, e.tie)


def ask_order(e: Entry) -> tuple[float, int, int]:
    return (e.price, e.time_submission, e.tie)


class _Ranked(msgspec.Struct):
    """One side of a slot kept in priority order as entries arrive, so that clearing at
    gate closure does not sort (half of its time otherwise): O(log n) compares per entry."""

    keys: list[tuple[float, int, int]] = []
    entries: list[Entry] = []

    def add(self, key: tuple[float, int, int], entry: Entry) -> None:
        i = bisect_right(self.keys, key)
        self.keys.insert(i, key)
        self.entries.insert(i, entry)

    def merge(self, keys: list[tuple[float, int, int]], entries: list[Entry]) -> None:
        """`add` of each (key, entry) in order, at once: a stable sort of the old then the new
        places them where the `bisect_right` of each would (after equal keys before them),
        in O(old + new log new) (the runs are found presorted) instead of a list insert each."""
        if not keys:
            return
        all_keys, all_entries = self.keys + keys, self.entries + entries
        order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
        self.keys = [all_keys[i] for i in order]
        self.entries = [all_entries[i] for i in order]

    def remove(self, key: tuple[float, int, int], uuid: str) -> None:
        i = bisect_left(self.keys, key)
        while self.entries[i].uuid != uuid:
            i += 1
        del self.keys[i]
        del self.entries[i]


class SlotBook(msgspec.Struct):
    bids: dict[str, Entry] = {}
    asks: dict[str, Entry] = {}
    client_keys: list[tuple[str, str]] = []
    ranked_bids: _Ranked = msgspec.field(default_factory=_Ranked)
    ranked_asks: _Ranked = msgspec.field(default_factory=_Ranked)
    open: dict[str, int] = {}  # participant -> its entries in this slot (bids and asks)

    def side(self, entry: Entry) -> tuple[dict[str, Entry], _Ranked, tuple[float, int, int]]:
        if entry.side == "bid":
            return self.bids, self.ranked_bids, bid_order(entry)
        return self.asks, self.ranked_asks, ask_order(entry)


class SlotDepth(msgspec.Struct, frozen=True):
    """One open slot of the book at a glance."""

    start: int
    bids: int
    bid_wh: int
    best_bid: float | None  # the highest bid price
    asks: int
    ask_wh: int
    best_ask: float | None  # the lowest ask price


class Book:
    def __init__(self) -> None:
        self._slots: dict[int, SlotBook] = {}
        self._where: dict[str, int] = {}  # uuid -> slot start
        self._client: dict[tuple[str, str], Entry] = {}  # (participant, client id) -> first entry
        # participant -> its open entries in all slots. Kept by `add`, `cancel`, `pop_slot` and
        # `clear` themselves (as is `SlotBook.open`), so whatever fills the book (a submit,
        # an undo, `Market.restore`) keeps the counts exact.
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def find_duplicate(self, candidate: Entry) -> Entry | None:
        """The first entry with the candidate's client id, or None if the id is new.
        Raises `conflict` if the id was used for different content."""
        if candidate.id is None:
            return None
        first = self._client.get((candidate.participant, candidate.id))
        if first is None:
            return None
        if first.content() != candidate.content():
            raise MarketError("conflict", f"client id {candidate.id!r} was used for another entry")
        return first

    def add(self, entry: Entry) -> None:
        start, who = entry.time_delivery[0], entry.participant
        slot = self._slots.get(start)
        if slot is None:
            slot = self._new_slot(start)
        self._put(slot, entry, slot.open.get(who, 0), self._open.get(who, 0))

    def admit(self, entry: Entry, max_in_slot: int, max_total: int) -> tuple[int, int] | None:
        """`add` the entry if its participant has fewer than `max_in_slot` open entries in its
        slot and fewer than `max_total` in all; else nothing, and those two counts (the
        engine's caps checked and booked in one look-up of the slot)."""
        start, who = entry.time_delivery[0], entry.participant
        slot = self._slots.get(start)
        in_slot = slot.open.get(who, 0) if slot is not None else 0
        total = self._open.get(who, 0)
        if in_slot >= max_in_slot or total >= max_total:
            return in_slot, total
        if slot is None:
            slot = self._new_slot(start)
        self._put(slot, entry, in_slot, total)
        return None

    def _new_slot(self, start: int) -> SlotBook:
        slot = self._slots[start] = SlotBook({}, {}, [], _Ranked([], []), _Ranked([], []), {})  # positional: fast
        return slot

    def _put(self, slot: SlotBook, entry: Entry, in_slot: int, total: int) -> None:
        """Book `entry` in `slot`, its participant having `in_slot` and `total` open entries."""
        uuid = entry.uuid
        if entry.side == "bid":  # `slot.side`, unrolled: once per entry submitted
            slot.bids[uuid] = entry
            slot.ranked_bids.add(bid_order(entry), entry)
        else:
            slot.asks[uuid] = entry
            slot.ranked_asks.add(ask_order(entry), entry)
        self._where[uuid] = entry.time_delivery[0]
        who = entry.participant
        slot.open[who] = in_slot + 1
        self._open[who] = total + 1
        if entry.id is not None:
            client_key = (entry.participant, entry.id)
            self._client[client_key] = entry
            slot.client_keys.append(client_key)

    def admit_all(self, start: int, entries: list[Entry], max_in_slot: int, max_total: int) -> bool:
        """`admit` of every entry (all of slot `start`) at once, if each participant stays within
        both caps and no client id is known or repeated: True. Else False and nothing booked
        (what `admit` one by one would refuse or find repeated, the caller asks it so)."""
        slot = self._slots.get(start)
        in_slot = slot.open if slot is not None else {}
        counts: dict[str, int] = {}
        for e in entries:
            who = e.participant
            counts[who] = counts.get(who, 0) + 1
        total = self._open
        for who, k in counts.items():
            if in_slot.get(who, 0) + k > max_in_slot or total.get(who, 0) + k > max_total:
                return False
        keys = [(e.participant, e.id) for e in entries if e.id is not None]
        if keys and (len(set(keys)) != len(keys) or not self._client.keys().isdisjoint(keys)):
            return False
        if slot is None:
            slot = self._new_slot(start)
        bids = [e for e in entries if e.side == "bid"]
        asks = [e for e in entries if e.side != "bid"]
        slot.bids.update((e.uuid, e) for e in bids)
        slot.asks.update((e.uuid, e) for e in asks)
        slot.ranked_bids.merge([bid_order(e) for e in bids], bids)
        slot.ranked_asks.merge([ask_order(e) for e in asks], asks)
        self._where.update(dict.fromkeys([e.uuid for e in entries], start))
        for who, k in counts.items():
            slot.open[who] = slot.open.get(who, 0) + k
            total[who] = total.get(who, 0) + k
        if keys:
            by_key = dict(zip(keys, (e for e in entries if e.id is not None), strict=True))
            self._client.update(by_key)
            slot.client_keys += keys
        return True

    def remember(self, entry: Entry) -> None:
        """Know a cancelled entry's client id (after a restart) without booking it: a retry
        of that id answers `duplicate`, never becomes a new order."""
        if entry.id is None:
            return
        slot = self._slots.get(entry.time_delivery[0])
        if slot is None:
            slot = self._new_slot(entry.time_delivery[0])
        key = (entry.participant, entry.id)
        self._client[key] = entry
        slot.client_keys.append(key)

    def forget(self, uuid: str) -> None:
        """Remove an entry as if it had never been added (its write failed)."""
        entry = self.get(uuid)
        if entry is None:
            return
        self.cancel(entry.participant, uuid)
        if entry.id is not None and self._client.get((entry.participant, entry.id)) is entry:
            del self._client[entry.participant, entry.id]

    def get(self, uuid: str) -> Entry | None:
        start = self._where.get(uuid)
        if start is None:
            return None
        slot = self._slots[start]
        return slot.bids.get(uuid) or slot.asks.get(uuid)

    def cancel(self, participant: str, uuid: str) -> Entry:
        entry = self.get(uuid)
        if entry is None or entry.participant != participant:
            # Someone else's uuid is reported as unknown: existence is not leaked.
            raise MarketError("not_found", f"no open entry {uuid!r}")
        slot = self._slots[entry.time_delivery[0]]
        by_uuid, ranked, rank = slot.side(entry)
        del by_uuid[uuid]
        ranked.remove(rank, uuid)
        del self._where[uuid]
        _decrement(slot.open, participant, 1)
        _decrement(self._open, participant, 1)
        return entry

    def pop_slot(self, start: int) -> tuple[list[Entry], list[Entry]]:
        """Remove a slot from the book (its gate closed): its bids by `bid_order` and its asks
        by `ask_order` (the order clearing takes them in)."""
        slot = self._slots.pop(start, None)
        if slot is None:
            return [], []
        for uuid in (*slot.bids, *slot.asks):
            del self._where[uuid]
        for key in slot.client_keys:
            self._client.pop(key, None)
        for who, n in slot.open.items():
            _decrement(self._open, who, n)
        return slot.ranked_bids.entries, slot.ranked_asks.entries

    def open_count(self, participant: str, start: int) -> tuple[int, int]:
        """The participant's open entries (bids and asks): in the slot at `start`, and in all
        slots. O(1)."""
        slot = self._slots.get(start)
        return (slot.open.get(participant, 0) if slot is not None else 0), self._open.get(participant, 0)

    def slots_until(self, start: int) -> list[int]:
        """Starts of the open slots at or before `start`, in time order."""
        return sorted(s for s in self._slots if s <= start)

    def entries(self) -> list[Entry]:
        """Every open entry, by slot then submission (for snapshots and resume)."""
        return [e for s in sorted(self._slots) for e in (*self._slots[s].bids.values(), *self._slots[s].asks.values())]

    def depth(self, limit: int) -> list[SlotDepth]:
        """Bids and asks of the earliest `limit` open slots: counts, Wh and best prices (the
        dashboard's order book; O(entries of those slots))."""
        out = []
        for start in sorted(self._slots)[:limit]:
            s = self._slots[start]
            bids, asks = s.ranked_bids.entries, s.ranked_asks.entries
            out.append(
                SlotDepth(
                    start=start,
                    bids=len(bids),
                    bid_wh=sum(e.quantity for e in bids),
                    best_bid=bids[0].price if bids else None,
                    asks=len(asks),
                    ask_wh=sum(e.quantity for e in asks),
                    best_ask=asks[0].price if asks else None,
                )
            )
        return out

    def clear(self) -> None:
        self._slots.clear()
        self._where.clear()
        self._client.clear()
        self._open.clear()


def _decrement(counts: dict[str, int], key: str, n: int) -> None:
    left = counts[key] - n
    if left:
        counts[key] = left
    else:
        del counts[key]  # only participants with open entries are kept
