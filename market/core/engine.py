"""The MicroTE market as a state machine over plain data: no sockets, clock or database.

Each delivery slot moves through the phases of `TRANSITIONS`: open (in the book) ->
matched (gate closed, cleared) -> delivering (the current round: meter readings accepted)
-> processed (energy exchanged, records produced). Methods return the events and records
they produced; the server emits and stores them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import msgspec

from market.core.book import Book, Entry, tie_key
from market.core.capacity import CapacityLimits, Cut, curtail
from market.core.clearing import Fill, Matching, Pricing, clear
from market.core.errors import ErrorCode, IllegalTransition, MarketError
from market.core.exchange import EXTERNAL, exchange
from market.core.grid import GridStates, GridTariff
from market.core.hierarchy import (
    UPSTREAM_ID,
    Residual,
    UpstreamFill,
    check_fills,
    matched,
    member_uuid,
    passed_reading,
    ref_of,
    residuals,
    settled,
    upstream_meter,
    upstream_settlements,
)
from market.core.protocol import MAX_QUANTITY, ConsumptionMsg, EntryMsg, MeterMsg, OrdersMsg, Side
from market.core.records import (
    BaseFlowRecord,
    CancelRecord,
    CurtailmentRecord,
    EntryRecord,
    MeterRecord,
    Record,
    RoundRecord,
    Settlement,
    Transaction,
    amount,
)
from market.core.timing import RoundTimes, Slot, is_aligned, round_times

# Batches of at least this many orders or readings are booked at once when nothing in
# them is refused (`Market._enter_all`, `_meter_all`); smaller ones (an agent's few orders)
# take the loop over their items, which the batch paths must match (their hypothesis test).
BATCH_FROM = 16


class Phase(enum.Enum):
    OPEN = "open"
    MATCHED = "matched"
    DELIVERING = "delivering"
    PROCESSED = "processed"


# The only legal moves of a slot; anything else raises IllegalTransition and changes nothing.
TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.OPEN, "close"): Phase.MATCHED,
    (Phase.MATCHED, "deliver"): Phase.DELIVERING,
    (Phase.DELIVERING, "process"): Phase.PROCESSED,
}


class MarketConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: Literal["sim", "rt"] = "sim"
    duration: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 60
    close_steps: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    horizon: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 96  # slots accepted beyond next_settle
    pricing: Pricing = "midpoint"
    # Who trades within a tied price level: "price_time" (earliest first, PROTOCOL.md) or
    # "pro_rata" (shared in proportion to quantity, exact in Wh: market/core/clearing.py).
    matching: Matching = "price_time"
    max_quantity: Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)] = MAX_QUANTITY
    price_min: float = 0.0
    price_max: float = 10.0
    non_dispatch: tuple[str, ...] = ("solar", "wind")
    dispatch: tuple[str, ...] = ("bess",)
    round_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    meter_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0
    rate_per_second: Annotated[float, msgspec.Meta(gt=0)] = 2000.0  # events per participant, sustained
    rate_burst: Annotated[int, msgspec.Meta(gt=0)] = 10000
    # Open entries (bids and asks) one participant may have: in one slot, and in all slots.
    # Past either, a new entry is refused `invalid` (docs/protocol.md, *Limits and integrity*).
    max_open_per_slot: Annotated[int, msgspec.Meta(gt=0)] = 1000
    max_open_total: Annotated[int, msgspec.Meta(gt=0)] = 10000
    timezone: str = "UTC"
    grid: GridTariff = GridTariff()
    # Grid fee per kWh on P2P fills of slots the DSO marked YELLOW (/grid `grid_state.set`):
    # a pair trades only if the bid covers the ask plus the fee; the buyer pays the fee on
    # top of what the seller receives, and the difference is the market operator's.
    yellow_fee: Annotated[float, msgspec.Meta(ge=0, le=1e3)] = 0.0
    # When acknowledged entries and readings become durable: "ack" before each reply (rt
    # default), "round" with the round's records before the `step` reply (sim default).
    durability: Literal["ack", "round"] | None = None

    def __post_init__(self) -> None:
        if not self.price_min < self.price_max:
            raise ValueError("price_min must be below price_max")
        if set(self.non_dispatch) & set(self.dispatch) or EXTERNAL in self.sources:
            raise ValueError("a source is either dispatch or non-dispatch, and not 'external'")
        try:
            ZoneInfo(self.timezone)
        except (ValueError, KeyError):
            raise ValueError(f"unknown timezone {self.timezone!r}") from None
        if self.grid.timezone != self.timezone:
            raise ValueError("the grid tariff's timezone must be the market's timezone")

    @property
    def ack_durable(self) -> bool:
        return (self.durability or ("ack" if self.mode == "rt" else "round")) == "ack"

    @property
    def sources(self) -> tuple[str, ...]:
        return self.dispatch + self.non_dispatch


class RoundOpen(msgspec.Struct, frozen=True):
    """What opening a round produced: the broadcast, private fills, and settlement records."""

    times: RoundTimes
    start_round: dict[str, Any]
    settled: list[tuple[str, dict[str, Any]]]  # (participant, `settled` payload), in commit order
    settlements: list[Settlement]


class SlotResult(msgspec.Struct, frozen=True):
    slot: Slot
    transactions: list[Transaction]
    meters: list[MeterRecord]
    metered: list[str]
    deliveries: dict[str, dict[str, Any]]  # participant -> `delivery` payload


def slot_records(
    opened: RoundOpen,
    result: SlotResult,
    journal: Iterable[Record],
    fills: Iterable[Settlement],
    missing: list[str],
    trades: int | None = None,
) -> tuple[list[Record], RoundRecord]:
    """What the ledger gets for a processed slot, in the order it is written: the journal's
    entries and cancels (its readings are in `result.meters`), the round's fills, the
    readings, the transactions; and the slot's `rounds` row (`trades`: len(fills) unless given)."""
    fills = list(fills)
    records: list[Record] = [*(r for r in journal if not isinstance(r, MeterRecord)), *fills, *result.meters]
    records += result.transactions
    slot = result.slot[0]
    summary = RoundRecord(
        id=f"r{opened.times.time}-{slot}",
        time=opened.times.time,
        duration=opened.times.duration,
        current_round_start=slot,
        matched_slot_start=opened.times.last_settle[0],
        trades=len(fills) if trades is None else trades,
        metered=len(result.metered),
        missing=msgspec.json.encode(missing).decode(),
        records=len(records),
    )
    return records, summary


class UpstreamResult(msgspec.Struct, frozen=True):
    settlements: list[Settlement]  # to store
    settled: list[tuple[str, dict[str, Any]]]  # (member, `settled` payload)


class _Delivering(msgspec.Struct):
    settlements: list[Settlement]
    meters: dict[str, MeterMsg]
    records: dict[str, MeterRecord]


class Recovered(msgspec.Struct, frozen=True):
    """What the ledger holds of a market that stopped: see `Market.restore`."""

    last_round: RoundRecord | None  # the latest processed round
    entries: list[EntryRecord]  # entries of slots that were still open
    cancels: list[CancelRecord]
    settlements: list[Settlement]  # fills of slots not yet processed
    meters: list[MeterRecord]  # acknowledged readings of slots not yet processed


def canonical_config(config: MarketConfig) -> str:
    """The configuration as the ledger's `runs` row keeps it: sorted JSON."""
    return msgspec.json.encode(msgspec.to_builtins(config, order="sorted")).decode()


# Of a meter reading's interval: the refusal before its sources are checked (misaligned),
# the one after (not taking readings), and its delivery when it takes them (Market._interval).
_Interval = tuple[tuple[ErrorCode, str] | None, tuple[ErrorCode, str] | None, _Delivering | None]


def _uuid_slot(uuid: str, participant: str) -> int | None:
    """The slot start named by `participant`'s entry uuid `slot.participant.n`, or by the
    `participant.slot.n` of ledgers written before 2026-12-07 (a market restarted on one
    holds such entries); None if `uuid` is neither of its."""
    first, _, rest = uuid.partition(".")
    owner, _, n = rest.rpartition(".")
    if owner == participant and first.isdigit() and n.isdigit():
        return int(first)
    head, _, n = uuid.rpartition(".")
    owner, _, start = head.rpartition(".")
    if owner == participant and start.isdigit() and n.isdigit():
        return int(start)
    return None


class Market:
    def __init__(
        self,
        config: MarketConfig,
        grid_states: GridStates | None = None,
        capacity: CapacityLimits | None = None,
        *,
        upstream: bool = False,
        journal: bool = True,
    ) -> None:
        """`journal` False: no ledger records of entries and readings are made (for a caller
        that writes no ledger: a research environment); fills, transactions and deliveries
        are the same."""
        self.config = config
        self.journaling = journal
        # A market below another (docs/hierarchy.md): each cleared slot's unmatched remainders
        # are kept for the market above, whose fills settle here with `UPSTREAM_ID`.
        self.upstream = upstream
        self._residuals: dict[int, list[Residual]] = {}
        self.grid_states = grid_states or GridStates()
        # Capacity-aware clearing (docs/grid.md): fills that would push a feeder branch past
        # its limit are curtailed at gate closure; `base_flows` per slot (W per branch, e.g.
        # the DSO's forecast) are what the branches carry before trading (zero if unset).
        self.capacity = capacity
        self.base_flows: dict[int, list[float]] = {}
        self.book = Book()
        self.times: RoundTimes | None = None
        self._phase: dict[int, Phase] = {}
        self._matched: dict[int, list[Settlement]] = {}
        self._delivering: dict[int, _Delivering] = {}
        self._processed_until = -1  # slots starting at or before this are done
        self._counters: dict[int, dict[str, int]] = {}  # slot -> participant -> entries so far
        self._early_meters: dict[int, dict[str, MeterRecord]] = {}  # recovered, for slots not delivering yet
        self.journal: list[Record] = []  # records of acknowledged actions, for the caller to persist
        self._cancelled: dict[str, Entry] = {}  # uuid -> entry cancelled but not yet durable (for `undo`)
        self._known_sources = frozenset(config.sources)
        self._known_with_external = self._known_sources | {EXTERNAL}
        # participant -> owner for accounts that share one (the registry's `owner`; set by the
        # server): the clearing never pairs a bid and an ask of one owner (wash trades).
        self.owners: Mapping[str, str] = {}

    def take_journal(self) -> list[Record]:
        """Records to make durable before the acknowledgement of the action that made them."""
        out, self.journal = self.journal, []
        return out

    # -- lifecycle -------------------------------------------------------------------------

    def phase(self, start: int) -> Phase:
        known = self._phase.get(start)
        if known is not None:
            return known
        return Phase.PROCESSED if start <= self._processed_until else Phase.OPEN

    def _move(self, start: int, event: str) -> None:
        nxt = TRANSITIONS.get((self.phase(start), event))
        if nxt is None:
            raise IllegalTransition(f"slot {start}: {event!r} in phase {self.phase(start).value}")
        self._phase[start] = nxt

    def open_round(self, t: int, duration: int | None = None, *, parties: Container[str] | None = None) -> RoundOpen:
        """Start the round at `t`: close and clear every slot up to `last_settle`, and start
        delivering `current_round`. `settled` holds the events of `parties` only, if given
        (as `process`)."""
        d = self._check_round(t, duration)
        times = round_times(t, d, self.config.close_steps, self.times.current_round if self.times else None)
        closing = sorted({*self.book.slots_until(times.last_settle[0]), times.last_settle[0], t})
        settlements: list[Settlement] = []
        for start in closing:
            if self.phase(start) is Phase.OPEN:
                settlements += self._close((start, start + d), t)
        # A step that jumps over matched slots delivers them too (nobody metered them), so
        # no fill is left stranded; the caller processes every delivering slot before `t`.
        for start in sorted(s for s, ph in self._phase.items() if ph is Phase.MATCHED and s < t):
            self._deliver(start)
        self._deliver(t)
        self.times = times
        return RoundOpen(times, self.start_round_payload(), _settled_events(settlements, parties), settlements)

    def _deliver(self, start: int) -> None:
        self._move(start, "deliver")
        early = self._early_meters.pop(start, {})
        self._delivering[start] = _Delivering(
            self._matched.pop(start, []), {p: _meter_msg(r) for p, r in early.items()}, early
        )

    def _check_round(self, t: int, duration: int | None) -> int:
        d = duration or (self.times.duration if self.times else self.config.duration)
        if self.times is not None and t <= self.times.time:
            raise MarketError("invalid", f"round time {t} does not advance past {self.times.time}")
        if t % d:
            raise MarketError("invalid", f"round time {t} is not aligned to duration {d}")
        if (
            self.times is not None
            and d != self.times.duration
            and (len(self.book) or self._delivering or self._matched)
        ):
            raise MarketError("invalid", "duration can change only when no entry or slot is pending")
        return d

    def _close(self, slot: Slot, now: int) -> list[Settlement]:
        bids, asks = self.book.pop_slot(slot[0])
        self._move(slot[0], "close")
        self._counters.pop(slot[0], None)
        state = self.grid_states.get(slot[0])
        if state == "RED":
            fills: list[Fill] = []  # the DSO forbids P2P trade in this slot: all settle with the grid
        elif state == "YELLOW" and self.config.yellow_fee > 0:
            fills = _clear_with_fee(
                bids, asks, self.config.pricing, self.config.yellow_fee, self.owners, self.config.matching
            )
        else:
            fills = clear(
                bids, asks, self.config.pricing, ranked=True, owners=self.owners, matching=self.config.matching
            )
        cuts: list[Cut] = []
        cleared = fills
        base = self.base_flows.pop(slot[0], None)
        if self.capacity is not None and fills:
            fills, cuts = curtail(fills, self.capacity, slot[1] - slot[0], base)
        if self.capacity is not None and base is not None:
            flows = msgspec.json.encode(base).decode()
            self.journal.append(BaseFlowRecord(f"b{slot[0]}", slot[0], slot[1], flows, now))
        records = [self._settlement(slot, i, f, now) for i, f in enumerate(fills)]
        self._matched[slot[0]] = records
        if self.upstream:
            self._residuals[slot[0]] = residuals((*bids, *asks), matched(fills))
        if cuts:
            assert self.capacity is not None
            self.journal += _curtailments(slot, cleared, fills, cuts, self.capacity, now)
        return records

    def _settlement(self, slot: Slot, seq: int, f: Fill, now: int) -> Settlement:
        source = f.ask.source or ""
        return Settlement(
            commit_id=f"c{slot[0]}-{seq}",
            time_delivery_start=slot[0],
            time_delivery_end=slot[1],
            seller_id=f.ask.participant,
            buyer_id=f.bid.participant,
            bid_uuid=f.bid.uuid,
            ask_uuid=f.ask.uuid,
            bid_id=f.bid.id,
            ask_id=f.ask.id,
            energy_source=source,
            quantity=f.quantity,
            price_buy=f.price_buy,
            price_sell=f.price_sell,
            amount_buy=amount(f.quantity, f.price_buy),
            amount_sell=amount(f.quantity, f.price_sell),
            dispatch=source in self.config.dispatch,
            seq=seq,
            time_creation=now,
        )

    # -- a market above (docs/hierarchy.md) ----------------------------------------------

    def residual_slots(self) -> list[int]:
        """Slots cleared and not yet processed whose residuals are kept."""
        return sorted(self._residuals)

    def residuals_of(self, start: int) -> list[Residual]:
        """What the clearing of slot `start` left unmatched (kept until it is processed)."""
        return list(self._residuals.get(start, ()))

    def upstream_fills(self, start: int, fills: Sequence[UpstreamFill], now: int) -> UpstreamResult:
        """Settle fills of the slot's residuals in the markets above: settlements between each
        member and `UPSTREAM_ID` after the others, for the caller to store (`drop_upstream`
        if it cannot), and the members' `settled` events. In batches (each market above),
        before the slot is processed; a fill already settled (same `ref`) is settled once; a
        bad fill refuses the batch."""
        if not self.upstream:
            raise MarketError("invalid", "this market has no market above it")
        phase = self.phase(start)
        if phase not in (Phase.MATCHED, Phase.DELIVERING):
            raise MarketError(
                "closed", f"slot {start} is {phase.value}: upstream fills come between clearing and processing"
            )
        local = self._matched.get(start) if phase is Phase.MATCHED else self._delivering[start].settlements
        assert local is not None
        d = self._require_round().duration
        before = {ref_of(s): s for s in local if s.commit_id.startswith("u")}
        fresh = [f for f in fills if f.ref not in before]
        for f in fills:  # a resend (a controller retrying after a restart) settles nothing twice
            known = before.get(f.ref)
            if known is not None:
                again = upstream_settlements((start, start + d), [f], known.seq, now, self.config.dispatch)[0]
                if _timeless(msgspec.structs.replace(again, commit_id=known.commit_id)) != _timeless(known):
                    raise MarketError("conflict", f"upstream fill {f.ref} of slot {start} was settled otherwise")
        if len({f.ref for f in fresh}) != len(fresh):
            raise MarketError("invalid", f"upstream fills of slot {start} name one fill twice")
        taken: dict[str, int] = {}
        for s in before.values():
            taken[member_uuid(s)] = taken.get(member_uuid(s), 0) + s.quantity
        try:
            check_fills(fresh, {r.uuid: r for r in self._residuals.get(start, ())}, taken)
        except ValueError as err:
            raise MarketError("invalid", str(err)) from None
        unknown = sorted({f.source for f in fresh} - self._known_sources)
        if unknown:
            raise MarketError("invalid", f"upstream fills of slot {start}: unknown source {unknown[0]!r}")
        settlements = upstream_settlements(
            (start, start + d), fresh, len(local), now, self.config.dispatch, first_id=len(before)
        )
        local += settlements
        return UpstreamResult(settlements, [(p, e) for p, e in _settled_events(settlements) if p != UPSTREAM_ID])

    def drop_upstream(self, start: int, settlements: Sequence[Settlement]) -> None:
        """Take back upstream settlements that could not be stored (as if never given)."""
        dropped = {s.commit_id for s in settlements}
        for fills in (self._matched.get(start), getattr(self._delivering.get(start), "settlements", None)):
            if fills is not None:
                fills[:] = [s for s in fills if s.commit_id not in dropped]

    def _check_not_upstream(self, participant: str) -> None:
        if self.upstream and participant == UPSTREAM_ID:
            raise MarketError("forbidden", f"{UPSTREAM_ID!r} is the account of the market above: nobody trades as it")

    def market_info(self, slots: Iterable[Slot]) -> list[dict[str, Any]]:
        info = []
        for s in slots:
            buy, sell = self.config.grid.prices(s[0])
            info.append(
                {
                    "time_delivery": list(s),
                    "grid": {"buy_price": buy, "sell_price": sell},
                    "grid_state": self.grid_states.get(s[0]),
                }
            )
        return info

    def start_round_payload(self) -> dict[str, Any]:
        r = self._require_round()
        slots = dict.fromkeys([r.current_round, r.last_settle, r.next_settle])
        return {
            "mode": self.config.mode,
            "time": r.time,
            "duration": r.duration,
            "timezone": self.config.timezone,
            "current_round": list(r.current_round),
            "last_round": list(r.last_round),
            "next_settle": list(r.next_settle),
            "last_settle": list(r.last_settle),
            "market_info": self.market_info(slots),
        }

    def _require_round(self) -> RoundTimes:
        if self.times is None:
            raise MarketError("unavailable", "the market has not started its first round")
        return self.times

    # -- entries ---------------------------------------------------------------------------

    def submit(self, participant: str, side: Side, msg: EntryMsg) -> dict[str, Any]:
        """Add a bid or ask; the ok reply's fields (`entry`, and `duplicate` on a resubmission)."""
        self._check_not_upstream(participant)
        entry, duplicate = self._enter(participant, side, msg, self._require_round(), {})
        if duplicate:
            return {"entry": entry.reply(), "duplicate": True}
        return {"entry": entry.reply()}

    def submit_each(self, items: Iterable[tuple[str, Side, EntryMsg]]) -> list[tuple[Entry, bool] | MarketError]:
        """`submit` of each (participant, side, entry) in order, without the reply dicts: the
        booked entry (or the first one, for a resubmission) and whether it was a duplicate,
        or the refusal. One refused entry does not undo the others."""
        if self.times is None:  # each is refused as `submit` refuses it
            return [_refusal(self.submit, item) for item in items]
        items = items if isinstance(items, list) else list(items)
        if len(items) >= BATCH_FROM and not self.upstream:
            booked = self._enter_all(items, self.times)
            if booked is not None:
                return booked
        return self._enter_each(items, self.times)

    def _enter_each(
        self, items: Iterable[tuple[str, Side, EntryMsg]], r: RoundTimes
    ) -> list[tuple[Entry, bool] | MarketError]:
        """`_enter` of each item in order, its refusal in its place: the reference path."""
        out: list[tuple[Entry, bool] | MarketError] = []
        upstream = self.upstream
        slots: dict[Slot, tuple[ErrorCode, str] | None] = {}  # a batch's entries share a few slots
        for participant, side, msg in items:
            try:
                if upstream:
                    self._check_not_upstream(participant)
                out.append(self._enter(participant, side, msg, r, slots))
            except MarketError as err:
                out.append(err)
        return out

    def _enter(
        self,
        participant: str,
        side: Side,
        msg: EntryMsg,
        r: RoundTimes,
        slots: dict[Slot, tuple[ErrorCode, str] | None],
    ) -> tuple[Entry, bool]:
        """Book one entry. `slots` memoizes `_slot_refusal` over a batch (the round is the same)."""
        slot = msg.time_delivery
        refused = slots[slot] if slot in slots else slots.setdefault(slot, self._slot_refusal(slot, r))
        if refused is not None:
            raise MarketError(*refused)
        self._check_values(side, msg)
        start = slot[0]
        counters = self._counters.get(start)
        if counters is None:
            counters = self._counters[start] = {}
        n = counters.get(participant, 0)
        # Slot first: a round's entries are neighbours in the ledger's key index, where
        # `participant.slot.n` put each participant's at its own page (a durable commit then
        # wrote a page per participant, and more as the ledger grew).
        uuid = f"{start}.{participant}.{n}"
        # Positional, in field order: uuid, id, participant, side, quantity, price,
        # time_delivery, source, time_submission, tie.
        entry = Entry(uuid, msg.id, participant, side, msg.quantity, msg.price, slot, msg.source, r.time, tie_key(uuid))
        if msg.id is not None:
            first = self.book.find_duplicate(entry)
            if first is not None:
                return first, True
        c = self.config
        over = self.book.admit(entry, c.max_open_per_slot, c.max_open_total)
        if over is not None:
            raise _over_cap(c, start, *over)
        counters[participant] = n + 1
        if self.journaling:
            self.journal.append(_entry_record(entry, n))
        return entry, False

    def _enter_all(
        self, items: list[tuple[str, Side, EntryMsg]], r: RoundTimes
    ) -> list[tuple[Entry, bool] | MarketError] | None:
        """Book a batch of one slot at once (a fleet's or a population's orders of a round) if
        no item would be refused or repeat a client id: what `_enter` of each in order gives,
        the same entries, uuids, journal and book. None, and nothing changed, if one would be:
        the caller then enters them one by one, which names each refusal."""
        slot = items[0][2].time_delivery
        if self._slot_refusal(slot, r) is not None:
            return None
        c, known = self.config, self._known_sources
        top, low, high = c.max_quantity, c.price_min, c.price_max
        for _, side, msg in items:  # `_check_values` of each, and one slot for all
            source = msg.source
            if (
                msg.time_delivery != slot
                or msg.quantity > top
                or not low <= msg.price <= high
                or (source is None and side == "ask")
                or (source is not None and source not in known)
            ):
                return None
        start = slot[0]
        counters = self._counters.get(start)
        counters = {} if counters is None else dict(counters)  # kept only if all are booked
        entries, seqs, t = [], [], r.time
        for participant, side, msg in items:
            n = counters.get(participant, 0)
            counters[participant] = n + 1
            uuid = f"{start}.{participant}.{n}"  # as `_enter` makes it and `_uuid_slot` reads it
            entries.append(
                Entry(uuid, msg.id, participant, side, msg.quantity, msg.price, slot, msg.source, t, tie_key(uuid))
            )
            seqs.append(n)
        if not self.book.admit_all(start, entries, c.max_open_per_slot, c.max_open_total):
            return None
        self._counters[start] = counters
        if self.journaling:
            self.journal += [_entry_record(e, n) for e, n in zip(entries, seqs, strict=True)]
        return [(e, False) for e in entries]

    def set_base_flows(self, slot: Slot, flows_w: Sequence[float]) -> None:
        """The feeder's branch flows before trading in `slot` (W per branch, in the
        sensitivities' order, towards the slack; the DSO's forecast), for capacity-aware
        clearing at its gate. Only while the gate is open and within the horizon, so at most
        `horizon` slots are held; a later setting replaces an earlier one."""
        if self.capacity is None:
            raise MarketError("invalid", "capacity-aware clearing is off: no branch flows to set ([feeder] capacity)")
        r = self._require_round()
        if not is_aligned(slot, r.duration):
            raise MarketError("invalid", f"time_delivery {list(slot)} is not an aligned {r.duration} s slot")
        if slot[0] < r.next_settle[0]:
            raise MarketError("closed", f"the gate of slot {slot[0]} has closed (next open slot {r.next_settle[0]})")
        if slot[0] > r.next_settle[0] + self.config.horizon * r.duration:
            raise MarketError("invalid", f"slot {slot[0]} is beyond the horizon of {self.config.horizon} slots")
        n = len(self.capacity.sensitivities.branches)
        if len(flows_w) != n:
            raise MarketError("invalid", f"flows_w has {len(flows_w)} values: the feeder has {n} branches")
        self.base_flows[slot[0]] = list(flows_w)

    def _slot_refusal(self, slot: Slot, r: RoundTimes) -> tuple[ErrorCode, str] | None:
        """Why an entry for `slot` is refused in round `r` whatever its values (code,
        message), or None: what depends on the slot alone, checked first."""
        if not is_aligned(slot, r.duration):
            return "invalid", f"time_delivery {list(slot)} is not an aligned {r.duration} s slot"
        start = slot[0]
        if start < r.next_settle[0]:
            return "closed", f"the gate of slot {start} has closed (next open slot {r.next_settle[0]})"
        if start > r.next_settle[0] + self.config.horizon * r.duration:
            return "invalid", f"slot {start} is beyond the horizon of {self.config.horizon} slots"
        return None

    def _check_values(self, side: Side, msg: EntryMsg) -> None:
        c = self.config
        if msg.quantity > c.max_quantity:
            raise MarketError("invalid", f"quantity above max_quantity {c.max_quantity}")
        if not c.price_min <= msg.price <= c.price_max:
            raise MarketError("invalid", f"price outside [{c.price_min}, {c.price_max}]")
        if side == "ask" and msg.source is None:
            raise MarketError("invalid", "an ask needs a source")
        if msg.source is not None and msg.source not in self._known_sources:  # c.sources, as a set
            raise MarketError("invalid", f"unknown source {msg.source!r} (known: {', '.join(c.sources)})")

    def submit_orders(self, participant: str, msg: OrdersMsg) -> list[dict[str, Any]]:
        """Each order on its own: one refused order does not undo the others."""
        return [order_reply(r) for r in self.submit_each((participant, o.side, o.entry()) for o in msg.orders)]

    def cancel(self, participant: str, uuid: str) -> dict[str, Any]:
        r = self._require_round()
        entry = self.book.get(uuid)
        if entry is None:
            # Its own entry of a slot whose gate closed has left the book: PROTOCOL.md says
            # `closed`. Uuids are `slot.participant.n`, so the slot is known without it.
            slot = _uuid_slot(uuid, participant)
            if slot is not None and slot < r.next_settle[0]:
                raise MarketError("closed", "the entry's slot is past gate closure")
        elif entry.participant == participant and entry.time_delivery[0] < r.next_settle[0]:
            raise MarketError("closed", "the entry's slot is past gate closure")
        entry = self.book.cancel(participant, uuid)
        self._cancelled[uuid] = entry
        self.journal.append(CancelRecord(uuid, participant, entry.time_delivery[0], r.time))
        return {"entry": entry.reply()}

    # -- meters and delivery ---------------------------------------------------------------

    def meter(self, participant: str, msg: MeterMsg) -> dict[str, Any]:
        r = self._require_round()
        return self._meter(participant, msg, r, self._interval(msg.time_interval, r))

    def meter_each(
        self,
        items: Iterable[tuple[str, MeterMsg]],
        *,
        sources: tuple[Collection[str], Collection[str], Collection[str]] | None = None,
    ) -> list[dict[str, Any] | MarketError]:
        """`meter` of each (participant, reading) in order, the refusal in place of a reply:
        what depends on the interval alone is checked once per interval, not per reading (a
        batch's readings are of one slot). One refused reading does not undo the others.
        `sources`: the generation, bess and other sources that every reading's maps draw on
        (a columnar batch's columns): if all are known, no reading's are checked again."""
        if self.times is None:  # each is refused as `meter` refuses it
            return [_refusal(self.meter, item) for item in items]
        r = self.times
        known = sources is not None and self._sources_known(*sources)
        items = items if isinstance(items, list) else list(items)
        if known and len(items) >= BATCH_FROM and not self.upstream:
            stored = self._meter_all(items, r)
            if stored is not None:
                return stored
        intervals: dict[Slot, _Interval] = {}
        out: list[dict[str, Any] | MarketError] = []
        for participant, msg in items:
            slot = msg.time_interval
            checked = intervals.get(slot)
            if checked is None:
                checked = intervals[slot] = self._interval(slot, r)
            try:
                out.append(self._meter(participant, msg, r, checked, known))
            except MarketError as err:
                out.append(err)
        return out

    def _meter_all(self, items: list[tuple[str, MeterMsg]], r: RoundTimes) -> list[dict[str, Any] | MarketError] | None:
        """Store a batch of first readings of one delivering slot at once, their sources
        known (the caller checked them for the batch): what `_meter` of each in order gives.
        None, and nothing changed, if one is of another slot, a repeat, or refused."""
        slot = items[0][1].time_interval
        misaligned, closed, delivering = self._interval(slot, r)
        if misaligned is not None or closed is not None or delivering is None:
            return None
        participants = [p for p, _ in items]
        meters = delivering.meters
        if (
            any(msg.time_interval != slot for _, msg in items)
            or len(set(participants)) != len(participants)
            or not meters.keys().isdisjoint(participants)
        ):
            return None
        meters.update(items)
        if self.journaling:
            now = r.time
            records = [_meter_record(p, slot, msg, now) for p, msg in items]
            delivering.records.update(zip(participants, records, strict=True))
            self.journal += records
        return [{} for _ in items]

    def _interval(self, slot: Slot, r: RoundTimes) -> _Interval:
        """What a reading of `slot` is refused for before and after its sources are checked
        (None: nothing), and the slot's delivery if it takes readings."""
        if not is_aligned(slot, r.duration):
            return ("invalid", f"time_interval {list(slot)} is not an aligned {r.duration} s slot"), None, None
        phase = self.phase(slot[0])
        if phase is not Phase.DELIVERING:
            if phase is Phase.PROCESSED or slot[0] < r.current_round[0]:
                return None, ("closed", f"interval {slot[0]} is already processed"), None
            return None, ("invalid", f"interval {slot[0]} has not been delivered yet"), None
        return None, None, self._delivering[slot[0]]

    def _meter(
        self, participant: str, msg: MeterMsg, r: RoundTimes, checked: _Interval, sources_known: bool = False
    ) -> dict[str, Any]:
        if self.upstream:
            self._check_not_upstream(participant)
        misaligned, closed, delivering = checked
        if misaligned is not None:
            raise MarketError(*misaligned)
        if not sources_known:
            self._check_meter_sources(msg)
        if closed is not None:
            raise MarketError(*closed)
        assert delivering is not None
        slot = msg.time_interval
        first = delivering.meters.get(participant)
        if first is not None:
            if first != msg:
                raise MarketError("conflict", f"a different reading for interval {slot[0]} was already accepted")
            return {"duplicate": True}
        delivering.meters[participant] = msg
        if self.journaling:
            record = delivering.records[participant] = _meter_record(participant, slot, msg, r.time)
            self.journal.append(record)
        return {}

    def _sources_known(self, generation: Collection[str], bess: Collection[str], other: Collection[str]) -> bool:
        known = self._known_sources
        return (
            all(s in known for s in generation)
            and all(s in known for s in bess)
            and all(s in self._known_with_external for s in other)
        )

    def _check_meter_sources(self, msg: MeterMsg) -> None:
        known = self._known_sources
        other = msg.consumption.other
        if (
            msg.generation.keys() <= known
            and msg.consumption.bess.keys() <= known
            and other.keys() <= self._known_with_external
        ):
            return  # the usual reading: no set built
        for where, keys in (
            ("generation", msg.generation),
            ("consumption.bess", msg.consumption.bess),
            ("consumption.other", msg.consumption.other),
        ):
            unknown = keys.keys() - known
            if unknown and (where != "consumption.other" or unknown != {EXTERNAL}):
                bad = sorted(unknown - ({EXTERNAL} if where == "consumption.other" else set()))
                raise MarketError("invalid", f"unknown source {bad[0]!r} in {where}")

    def metered(self, slot_start: int) -> list[str]:
        d = self._delivering.get(slot_start)
        return sorted(d.meters) if d else []

    def delivering(self) -> list[int]:
        return sorted(self._delivering)

    def process(self, slot_start: int, now: int, *, parties: Container[str] | None = None) -> SlotResult:
        """Exchange the energy of a delivered slot: its records, and each party's `delivery`
        (only those in `parties`, if given: an in-process caller that reads the rows)."""
        self._move(slot_start, "process")
        d = self._delivering.pop(slot_start)
        self._phase.pop(slot_start, None)
        self._processed_until = max(self._processed_until, slot_start)
        duration = self._require_round().duration
        slot = (slot_start, slot_start + duration)
        buy, sell = self.config.grid.prices(slot_start)
        self._residuals.pop(slot_start, None)
        reading = upstream_meter(slot, d.settlements) if self.upstream and UPSTREAM_ID not in d.meters else None
        if reading is not None:  # the market above delivers what it sold and takes what it bought
            d.meters[UPSTREAM_ID] = reading
        rows = exchange(slot, d.settlements, d.meters, buy, sell, now, self.config.non_dispatch)
        if reading is not None:
            # The upstream account is a pass-through: what members did not deliver of an upstream
            # sale is short above too (settled there), not bought from this market's grid; its
            # reading on the ledger is what physically passed (docs/hierarchy.md, *Delivery*).
            rows = [t for t in rows if not (t.kind == "grid_buy" and t.buyer_id == UPSTREAM_ID)]
            passed = passed_reading(slot, rows)
            d.meters[UPSTREAM_ID] = passed
            if self.journaling:
                d.records[UPSTREAM_ID] = _meter_record(UPSTREAM_ID, slot, passed, now)
        self.grid_states.forget_before(slot_start)
        return SlotResult(
            slot=slot,
            transactions=rows,
            meters=[d.records[p] for p in sorted(d.records)],
            metered=sorted(d.meters),
            deliveries=deliveries(slot, rows, parties),
        )

    def reset(self) -> None:
        """Forget books, fills and readings (a new simulation); ids keep counting."""
        self.book.clear()
        self._phase.clear()
        self._matched.clear()
        self._delivering.clear()
        self._processed_until = -1
        self._early_meters.clear()
        self._cancelled.clear()
        self._residuals.clear()
        self.times = None

    def restore(self, rec: Recovered) -> None:
        """Resume after a restart from everything the ledger holds (docs/protocol.md, *Resume
        and catch-up*): the last processed slot, the fills of every slot cleared but not
        processed (such a slot is matched again, with exactly those fills), and every
        acknowledged entry of a slot not cleared yet (back in the book, cancelled ones
        remembered by client id). Entry counters continue after the highest recorded
        sequence, so no uuid is ever given twice. A slot whose gate closed while the market
        was down is cleared at the first round after the restart, from the same book."""
        last = rec.last_round
        gate = -1  # slots starting at or before this were cleared before the stop
        if last is not None:
            self.times = round_times(last.time, last.duration, self.config.close_steps)
            self._processed_until = last.current_round_start
            d, gate = last.duration, self.times.last_settle[0]
            for start in range(self._processed_until + d, gate + d, d):
                self._phase[start] = Phase.MATCHED  # cleared before the stop (with or without fills)
                self._matched.setdefault(start, [])
        for s in sorted(rec.settlements, key=lambda s: (s.time_delivery_start, s.seq)):
            if s.time_delivery_start <= self._processed_until:
                continue
            self._phase[s.time_delivery_start] = Phase.MATCHED
            self._matched.setdefault(s.time_delivery_start, []).append(s)
        cancelled = {c.id for c in rec.cancels}
        for e in sorted(rec.entries, key=lambda e: (e.time_delivery_start, e.participant_id, e.seq)):
            start = e.time_delivery_start
            if start <= gate or start <= self._processed_until or start in self._matched:
                continue
            counters = self._counters.setdefault(start, {})
            counters[e.participant_id] = max(counters.get(e.participant_id, 0), e.seq + 1)
            if e.id in cancelled:
                self.book.remember(_entry_from_record(e))
            else:
                self.book.add(_entry_from_record(e))
        for m in rec.meters:
            if m.time_interval_start > self._processed_until:
                self._early_meters.setdefault(m.time_interval_start, {})[m.participant_id] = m
        if self.upstream:  # what the clearing of each matched slot left, as it was before the stop
            for start, fills in self._matched.items():
                own = [
                    _entry_from_record(e)
                    for e in rec.entries
                    if e.time_delivery_start == start and e.id not in cancelled
                ]
                local = [s for s in fills if not s.commit_id.startswith("u")]
                self._residuals[start] = residuals(own, settled(local))

    def undo(self, records: Iterable[Record]) -> None:
        """Take back acknowledged-to-be actions whose records could not be made durable: the
        state is as if they never happened (entry counters stay advanced: ids are never
        given twice). Only for records from `take_journal` of slots still in their phase."""
        for r in reversed(list(records)):
            if isinstance(r, EntryRecord):
                self.book.forget(r.id)
            elif isinstance(r, CancelRecord):
                entry = self._cancelled.pop(r.id, None)
                if entry is not None:
                    self.book.add(entry)
            elif isinstance(r, MeterRecord):
                d = self._delivering.get(r.time_interval_start)
                if d is not None and d.records.get(r.participant_id) is r:
                    del d.records[r.participant_id], d.meters[r.participant_id]

    def durable(self, records: Iterable[Record]) -> None:
        """The records are stored: their actions can no longer be undone."""
        for r in records:
            if isinstance(r, CancelRecord):
                self._cancelled.pop(r.id, None)


def _clear_with_fee(
    bids: list[Entry],
    asks: list[Entry],
    pricing: Pricing,
    fee: float,
    owners: Mapping[str, str],
    matching: Matching = "price_time",
) -> list[Fill]:
    """Clear with every ask raised by `fee`, then give each seller its fill's price less the
    fee (never below its own ask): nobody pays above its bid or receives below its ask, and
    the buyer pays `fee` per kWh more than the seller receives."""
    own = {a.uuid: a for a in asks}
    raised = [msgspec.structs.replace(a, price=a.price + fee) for a in asks]
    return [
        msgspec.structs.replace(f, ask=own[f.ask.uuid], price_sell=max(own[f.ask.uuid].price, f.price_sell - fee))
        # A constant fee keeps the asks' order (and their price levels).
        for f in clear(bids, raised, pricing, ranked=True, owners=owners, matching=matching)
    ]


def order_reply(r: tuple[Entry, bool] | MarketError) -> dict[str, Any]:
    """The reply of one order of a batch, from what `Market.submit_each` gave for it."""
    if isinstance(r, MarketError):
        return r.reply()
    if r[1]:
        return {"ok": True, "entry": r[0].reply(), "duplicate": True}
    return {"ok": True, "entry": r[0].reply()}


def _refusal(call: Callable[..., object], args: tuple[Any, ...]) -> MarketError:
    """The `MarketError` that `call(*args)` raises (it must raise one)."""
    try:
        call(*args)
    except MarketError as err:
        return err
    raise AssertionError("expected a refusal")


def _settled_events(
    settlements: list[Settlement], parties: Container[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    if _nobody(parties):
        return events
    for s in settlements:
        if parties is None or s.buyer_id in parties:
            events.append((s.buyer_id, settled_event(s, "bid")))
        if parties is None or s.seller_id in parties:
            events.append((s.seller_id, settled_event(s, "ask")))
    return events


def settled_event(s: Settlement, side: Side) -> dict[str, Any]:
    """The `settled` payload (PROTOCOL.md) of the buyer's (`bid`) or the seller's side of a fill."""
    common = {
        "commit_id": s.commit_id,
        "quantity": s.quantity,
        "source": s.energy_source,
        "time_delivery": [s.time_delivery_start, s.time_delivery_end],
    }
    if side == "bid":
        return {**common, "uuid": s.bid_uuid, "id": s.bid_id, "side": "bid", "price": s.price_buy}
    return {**common, "uuid": s.ask_uuid, "id": s.ask_id, "side": "ask", "price": s.price_sell}


def deliveries(slot: Slot, rows: list[Transaction], parties: Container[str] | None) -> dict[str, dict[str, Any]]:
    """Each party's `delivery` payload (PROTOCOL.md) of a slot's transaction rows, in the
    order parties first appear; only those in `parties`, if given."""
    by_party: dict[str, list[dict[str, Any]]] = {}
    if _nobody(parties):
        return {}
    if parties is not None:
        rows = [r for r in rows if r.seller_id in parties or r.buyer_id in parties]
    for row in rows:
        data = row.row()  # one dict per row, shared by both parties' payloads
        by_party.setdefault(row.seller_id, []).append(data)
        if row.buyer_id != row.seller_id:
            by_party.setdefault(row.buyer_id, []).append(data)
    if parties is not None:
        by_party = {p: txs for p, txs in by_party.items() if p in parties}
    return {p: {"time_delivery": list(slot), "transactions": txs} for p, txs in by_party.items()}


def _nobody(parties: Container[str] | None) -> bool:
    """Whether `parties` is an empty collection: no payload to make (an in-process market
    whose participants are all members of its population, which read the records)."""
    return isinstance(parties, Collection) and not parties


def _over_cap(c: MarketConfig, start: int, in_slot: int, total: int) -> MarketError:
    """The refusal of an entry past its participant's caps of open entries (`Book.admit`
    counts them, so they are exact through cancels, gate closure, undo and restore)."""
    if in_slot >= c.max_open_per_slot:
        return MarketError(
            "invalid",
            f"{in_slot} open entries in slot {start}: at most max_open_per_slot = {c.max_open_per_slot}"
            " per participant (cancel one first)",
        )
    return MarketError(
        "invalid",
        f"{total} open entries: at most max_open_total = {c.max_open_total} per participant"
        " (cancel one, or wait for a gate to close)",
    )


def _entry_record(e: Entry, seq: int) -> EntryRecord:
    # Positional, in field order (id, client_id, participant_id, side, quantity, price,
    # time_delivery_start, time_delivery_end, source, time_submission, seq): one per entry.
    return EntryRecord(
        e.uuid, e.id, e.participant, e.side, e.quantity, e.price, *e.time_delivery, e.source, e.time_submission, seq
    )


def _timeless(s: Settlement) -> Settlement:
    return msgspec.structs.replace(s, time_creation=0)


def _entry_from_record(r: EntryRecord) -> Entry:
    side: Side = "bid" if r.side == "bid" else "ask"
    return Entry(
        uuid=r.id,
        id=r.client_id,
        participant=r.participant_id,
        side=side,
        quantity=r.quantity,
        price=r.price,
        time_delivery=(r.time_delivery_start, r.time_delivery_end),
        source=r.source,
        time_submission=r.time_submission,
        tie=tie_key(r.id),
    )


def _meter_msg(r: MeterRecord) -> MeterMsg:
    return MeterMsg(
        time_interval=(r.time_interval_start, r.time_interval_end),
        generation=msgspec.json.decode(r.generation, type=dict[str, int]),
        consumption=msgspec.json.decode(r.consumption, type=ConsumptionMsg),
    )


_SORTED = msgspec.json.Encoder(order="sorted")


def _meter_record(participant: str, slot: Slot, m: MeterMsg, now: int) -> MeterRecord:
    enc = _SORTED
    # Positional, in field order (id, participant_id, time_interval_start, time_interval_end,
    # generation, consumption, time_creation): one per reading.
    return MeterRecord(
        f"m{slot[0]}-{participant}",
        participant,
        slot[0],
        slot[1],
        enc.encode(m.generation).decode(),
        enc.encode(m.consumption).decode(),
        now,
    )


def _curtailments(
    slot: Slot, cleared: Sequence[Fill], kept: Sequence[Fill], cuts: Sequence[Cut], limits: CapacityLimits, now: int
) -> list[Record]:
    """The ledger's account of each cut: kept fills keep their commit order, so the i-th
    fill of the clearing is the settlement c{start}-{j} where j counts the fills kept before."""
    dropped = {c.index for c in cuts if c.kept == 0}
    commit: dict[int, str] = {}
    j = 0
    for i in range(len(cleared)):
        if i not in dropped:
            commit[i] = f"c{slot[0]}-{j}"
            j += 1
    assert j == len(kept)
    branches = limits.sensitivities.branches
    return [
        CurtailmentRecord(
            id=f"k{slot[0]}-{c.index}",
            time_delivery_start=slot[0],
            time_delivery_end=slot[1],
            seller_id=cleared[c.index].ask.participant,
            buyer_id=cleared[c.index].bid.participant,
            bid_uuid=cleared[c.index].bid.uuid,
            ask_uuid=cleared[c.index].ask.uuid,
            cleared=cleared[c.index].quantity,
            kept=c.kept,
            commit_id=commit.get(c.index),
            branch=branches[c.branch].name,
            flow_w=c.flow_w,
            limit_w=c.limit_w,
            time_creation=now,
        )
        for c in cuts
    ]
