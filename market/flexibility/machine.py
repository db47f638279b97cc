"""Flexibility (seed 001, Energy Web) as a pure core: docs/flexibility.md is its contract.

Each prosumer has at most one active **contract** with its aggregator: the production and
consumption it expects (its baseline), the flexibility it guarantees up (more production
or less consumption) and down (less production or more consumption), for how long, the
longest delay it needs between notice and delivery, a price per kWh for each direction,
and an expiry. Contracts are registered, renegotiated (a downward renegotiation costs
reputation), cancelled and expire; every change is a ledger record.

A grid operator (`dso`) **requests** +/-P W from an aggregator over `[start, end]`. The
request is offered to the aggregator's prosumers whose contract can serve it; those that
accept before the deadline are the candidates of the aggregator's **allocation strategy**
(`fair` or `reputation`, or any other `Strategy`); one request is handled at a time.
After the window, each allocated prosumer's meter data is **checked** against its
baseline (met within a 10 % margin or not); rewards and penalties move tokens (integer
micro-currency) and reputation follows (+ compliance, + participation, - downward
renegotiation, - penalties).

Nothing here touches a socket, clock or database: every method takes `now` (market time),
returns its reply, and leaves ledger records and server-to-client notices in an outbox
(`take_outbox`) that the namespace handler writes and emits. `snapshot`/`restore` let the
handler undo an event whose records could not be made durable; `resume(records)` rebuilds
the state from the ledger's records after a restart.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from market.core.errors import MarketError
from market.core.records import (
    FlexAllocationRecord,
    FlexAnswerRecord,
    FlexContractRecord,
    FlexDeliveryRecord,
    FlexReputationRecord,
    FlexRequestRecord,
    FlexTokenRecord,
    Record,
    amount,
)
from market.flexibility.contracts import (
    APPEND_ONLY,
    Allotment,
    Contract,
    Delivery,
    DeliveryCheck,
    Opened,
    Request,
    Savepoint,
    StrategyChoice,
    _State,
    check_delivery,
    energy_wh,
)
from market.flexibility.forecast import deliverable, delivery_ratio, trust_permille
from market.flexibility.messages import (
    RESULTS_PAGE_PROSUMERS,
    Answer,
    AnswerMsg,
    ContractRefMsg,
    ContractRegisterMsg,
    ContractRenegotiateMsg,
    Direction,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    Notice,
    RequestMsg,
    RequestRefMsg,
    ResultsMsg,
    StrategyMsg,
    TransferMsg,
)
from market.flexibility.strategies import (
    Candidate,
    FairStrategy,
    ReputationStrategy,
    Share,
    Strategy,
    default_strategies,
)

MAX_SUPPLY = 10**15  # micro-currency: at most 10^9 currency units minted in all

# The ledger records `Flexibility.resume` rebuilds the state from.
FLEX_RECORDS: tuple[type[Record], ...] = (
    FlexContractRecord,
    FlexRequestRecord,
    FlexAnswerRecord,
    FlexAllocationRecord,
    FlexDeliveryRecord,
    FlexTokenRecord,
    FlexReputationRecord,
)

# -- the core --------------------------------------------------------------------------------


class Flexibility:
    """Contracts, requests, allocations, deliveries, tokens and reputation of the aggregators
    of one server."""

    def __init__(self, config: FlexConfig | None = None, strategies: Mapping[str, Strategy] | None = None) -> None:
        self.config = config or FlexConfig()
        self.strategies: dict[str, Strategy] = dict(strategies or default_strategies(self.config))
        if self.config.strategy not in self.strategies:
            raise ValueError(f"unknown default strategy {self.config.strategy!r}")
        self._s = _State()
        # No active contract expires before this (None: not known, look): `expire` at the
        # start of every event is then O(1). A lower bound: registrations lower it.
        self._expiry_floor: int | None = None
        # request -> its allocations still without a reading (a cache of the state: what
        # `meter` would count; forgotten whenever the state is put back)
        self._unread: dict[str, int] = {}

    # -- outbox and undo -----------------------------------------------------------------

    def take_outbox(self) -> tuple[list[Record], list[Notice]]:
        """Ledger records and server-to-client notices produced since the last call."""
        records, notices = self._s.records, self._s.notices
        self._s.records, self._s.notices = [], []
        return records, notices

    def snapshot(self) -> _State:
        return self._s.copy()

    def restore(self, state: _State) -> None:
        self._s = state.copy()
        self._expiry_floor = None
        self._unread = {}

    def savepoint(self) -> Savepoint:
        """What `rollback` undoes an event to; cheaper than `snapshot` (the tables that grow
        with every request are not copied), and only valid until the next savepoint."""
        s = self._s
        return Savepoint(s.copy(share_append_only=True), tuple(len(getattr(s, name)) for name in APPEND_ONLY))

    def rollback(self, point: Savepoint) -> None:
        """Back to `point`: every change since undone (the state is then what `snapshot`
        would have returned at the savepoint)."""
        for name, length in zip(APPEND_ONLY, point.lengths, strict=True):
            table: dict[Any, Any] = getattr(point.state, name)  # the live table: shared
            while len(table) > length:
                table.popitem()  # the newest key first
        self._s = point.state.copy(share_append_only=True)
        self._expiry_floor = None
        self._unread = {}

    def _emit(self, pid: str, event: str, payload: dict[str, Any]) -> None:
        self._s.notices.append((pid, event, payload))

    # -- reading -------------------------------------------------------------------------

    def reputation(self, pid: str) -> int:
        return self._s.reputation.get(pid, self.config.reputation.initial)

    def tokens(self, pid: str) -> int:
        return self._s.tokens.get(pid, 0)

    def reserved(self, pid: str) -> int:
        """Tokens an aggregator holds for the rewards its unsettled allocations may cost."""
        return self._s.reserved.get(pid, 0)

    def available(self, pid: str) -> int:
        """Tokens `pid` may spend: its balance less what is reserved."""
        return self.tokens(pid) - self.reserved(pid)

    def supply(self) -> int:
        """Tokens minted by `fund`: the sum of every balance."""
        return self._s.supply

    def trust(self, pid: str) -> int:
        """The aggregator's trust in `pid` from its delivery history, permille (1000: full)."""
        n, ratios = self._s.history.get(pid, (0, 0))
        return trust_permille(n, ratios, self.config.trust_prior)

    def contract(self, contract_id: str) -> Contract:
        found = self._s.contracts.get(contract_id)
        if found is None:
            raise MarketError("not_found", f"unknown contract {contract_id!r}")
        return found

    def active_contract(self, prosumer: str) -> Contract | None:
        cid = self._s.active.get(prosumer)
        return None if cid is None else self._s.contracts[cid]

    def contracts(self, aggregator: str | None = None) -> list[Contract]:
        """Every contract (of one aggregator), oldest first, ended ones included."""
        return [c for c in self._s.contracts.values() if aggregator is None or c.aggregator == aggregator]

    def request(self, request_id: str) -> Request:
        found = self._s.requests.get(request_id)
        if found is None:
            raise MarketError("not_found", f"unknown request {request_id!r}")
        return found

    def requests(self) -> list[Request]:
        return list(self._s.requests.values())

    def strategy_of(self, aggregator: str) -> str:
        return self.choice_of(aggregator).name

    def choice_of(self, aggregator: str) -> StrategyChoice:
        """The aggregator's strategy and settings (the defaults if it never chose)."""
        found = self._s.strategies.get(aggregator)
        return found if found is not None else StrategyChoice(self.config.strategy, forecast=self.config.forecast)

    def allotments(self, request_id: str) -> list[Allotment]:
        return [self._s.allotments[(request_id, p)] for p in self._s.by_request.get(request_id, ())]

    def delivery(self, request_id: str, prosumer: str) -> Delivery | None:
        return self._s.deliveries.get((request_id, prosumer))

    def answers(self, request_id: str) -> dict[str, Answer]:
        r = self.request(request_id)
        return {p: self._s.answers[(r.id, p)] for p in r.offered if (r.id, p) in self._s.answers}

    # -- reputation and tokens -----------------------------------------------------------

    def _reputation(self, pid: str, reason: str, delta: int, ref: str, now: int) -> int:
        rules = self.config.reputation
        before = self.reputation(pid)
        score = rules.clamp(before + delta)
        n = self._s.reputation_seq.get(pid, 0) + 1
        self._s.reputation_seq[pid] = n
        self._s.reputation[pid] = score
        self._s.records.append(FlexReputationRecord(f"{pid}.{n}", pid, reason, score - before, score, ref, now))
        return score

    def _reserve(self, aggregator: str, micro: int) -> None:
        left = self.reserved(aggregator) + micro
        if left:
            self._s.reserved[aggregator] = left
        else:
            self._s.reserved.pop(aggregator, None)

    def _transfer(self, request: str, src: str, dst: str, micro: int, reason: str, prosumer: str, now: int) -> None:
        """A reward or a penalty of a delivery check; the caller made sure `src` can pay."""
        if micro <= 0:
            return
        if micro > self.tokens(src):
            raise AssertionError(f"{src} would overdraw: {self.tokens(src)} < {micro}")
        self._s.tokens[src] = self.tokens(src) - micro
        self._s.tokens[dst] = self.tokens(dst) + micro
        self._s.records.append(FlexTokenRecord(f"{request}.{prosumer}.{reason}", request, src, dst, micro, reason, now))

    # -- contracts -----------------------------------------------------------------------

    def expire(self, now: int) -> int:
        """End every active contract whose expiry is at or before `now`; returns how many."""
        if self._expiry_floor is not None and now < self._expiry_floor:
            return 0
        due = [cid for cid in self._s.active.values() if self._s.contracts[cid].expires <= now]
        for cid in sorted(due, key=lambda c: self._s.contracts[c].seq):
            old = self._s.contracts[cid]
            self._end(old, "expired", now)
        self._expiry_floor = min((self._s.contracts[c].expires for c in self._s.active.values()), default=2**62)
        return len(due)

    def _expires_at(self, t: int) -> None:
        if self._expiry_floor is not None:
            self._expiry_floor = min(self._expiry_floor, t)

    def _end(self, old: Contract, status: Literal["cancelled", "expired"], now: int) -> Contract:
        new = msgspec.structs.replace(old, status=status, version=old.version + 1)
        self._s.contracts[new.id] = new
        self._s.active.pop(new.prosumer, None)
        self._contract_event(new, status, now)
        return new

    def _contract_event(self, c: Contract, event: str, now: int, downward: bool = False) -> None:
        self._s.records.append(c.record(event, now, downward))
        payload = {"event": event, "contract": c.wire(), "downward": downward}
        self._emit(c.prosumer, "flex.contract", payload)
        self._emit(c.aggregator, "flex.contract", payload)

    def register(self, prosumer: str, msg: ContractRegisterMsg, now: int) -> dict[str, Any]:
        if msg.aggregator == prosumer:
            raise MarketError("invalid", "a prosumer cannot be its own aggregator")
        if msg.flex_up == 0 and msg.flex_down == 0:
            raise MarketError("invalid", "a contract guarantees some flexibility: flex_up or flex_down > 0")
        if msg.expires <= now:
            raise MarketError("invalid", f"expires {msg.expires} is not after now ({now})")
        current = self.active_contract(prosumer)
        if current is not None:
            if _terms(current) == _terms_of(msg):
                return {"contract": current.wire(), "duplicate": True}
            raise MarketError("conflict", f"contract {current.id!r} is active: renegotiate or cancel it first")
        if len(self._s.contracts) >= self.config.max_contracts:
            raise MarketError("too_large", f"at most {self.config.max_contracts} contracts")
        seq = self._s.next_contract
        c = Contract(
            id=f"fc{seq}",
            prosumer=prosumer,
            aggregator=msg.aggregator,
            source=msg.source,
            production=msg.production,
            consumption=msg.consumption,
            flex_up=msg.flex_up,
            flex_down=msg.flex_down,
            duration=msg.duration,
            notice=msg.notice,
            price_up=msg.price_up,
            price_down=msg.price_down,
            expires=msg.expires,
            status="active",
            version=1,
            seq=seq,
        )
        self._s.next_contract += 1
        self._s.contracts[c.id] = c
        self._s.active[prosumer] = c.id
        self._expires_at(c.expires)
        self._contract_event(c, "registered", now)
        return {"contract": c.wire()}

    def renegotiate(self, prosumer: str, msg: ContractRenegotiateMsg, now: int) -> dict[str, Any]:
        old = self._s.contracts.get(msg.id)
        if old is None or old.prosumer != prosumer:
            raise MarketError("not_found", f"unknown contract {msg.id!r}")
        if old.status != "active":
            raise MarketError("closed", f"contract {msg.id!r} is {old.status}")
        changes = {
            k: v for k, v in msgspec.structs.asdict(msg).items() if k != "id" and v is not None and v != getattr(old, k)
        }
        if not changes:
            return {"contract": old.wire(), "duplicate": True}
        new = msgspec.structs.replace(old, version=old.version + 1, **changes)
        if new.flex_up == 0 and new.flex_down == 0:
            raise MarketError("invalid", "a contract guarantees some flexibility: flex_up or flex_down > 0")
        if new.expires <= now:
            raise MarketError("invalid", f"expires {new.expires} is not after now ({now}): cancel instead")
        downward = new.downward_from(old)
        self._s.contracts[new.id] = new
        self._expires_at(new.expires)
        self._contract_event(new, "renegotiated", now, downward)
        if downward:
            self._reputation(prosumer, "renegotiation", -self.config.reputation.renegotiation, new.id, now)
        return {"contract": new.wire(), "downward": downward, "reputation": self.reputation(prosumer)}

    def cancel(self, by: str, msg: ContractRefMsg, now: int) -> dict[str, Any]:
        old = self._s.contracts.get(msg.id)
        if old is None or by not in (old.prosumer, old.aggregator):
            raise MarketError("not_found", f"unknown contract {msg.id!r}")
        if old.status != "active":
            raise MarketError("closed", f"contract {msg.id!r} is {old.status}")
        return {"contract": self._end(old, "cancelled", now).wire()}

    def set_strategy(self, aggregator: str, msg: StrategyMsg) -> dict[str, Any]:
        """The aggregator's strategy and its settings; each call replaces the whole choice."""
        base = self.strategies.get(msg.strategy)
        if base is None:
            raise MarketError("invalid", f"unknown strategy {msg.strategy!r}; known: {sorted(self.strategies)}")
        if msg.max_modulation_pct is not None and not isinstance(base, FairStrategy):
            raise MarketError("invalid", f"max_modulation_pct is a setting of fair, not of {msg.strategy!r}")
        if msg.price_weight is not None and not isinstance(base, ReputationStrategy):
            raise MarketError("invalid", f"price_weight is a setting of reputation, not of {msg.strategy!r}")
        forecast = self.config.forecast if msg.forecast is None else msg.forecast
        self._s.strategies[aggregator] = StrategyChoice(
            msg.strategy, msg.max_modulation_pct, msg.price_weight, forecast
        )
        given = {
            "max_modulation_pct": msg.max_modulation_pct,
            "price_weight": msg.price_weight,
            "forecast": msg.forecast,
        }
        return {"strategy": msg.strategy, **{k: v for k, v in given.items() if v is not None}}

    def _strategy(self, choice: StrategyChoice) -> Strategy:
        base = self.strategies[choice.name]
        if choice.max_modulation_pct is not None and isinstance(base, FairStrategy):
            return FairStrategy(choice.max_modulation_pct)
        if choice.price_weight is not None and isinstance(base, ReputationStrategy):
            return ReputationStrategy(choice.price_weight)
        return base

    def _capacity(self, c: Contract, direction: Direction, start: int, end: int, forecast: bool) -> int:
        """What a candidate may be allocated: its contract's flexibility, or the forecast of
        what it can deliver over the window (`market.flexibility.forecast`)."""
        if not forecast:
            return c.capacity(direction)
        return deliverable(c, direction, start, end, self.trust(c.prosumer), self.config)

    # -- tokens (ERC20-like) --------------------------------------------------------------

    def fund(self, operator: str, msg: FundMsg, now: int) -> dict[str, Any]:
        """Mint tokens to an aggregator's budget (the operator's `flex.fund`: ERC20 `mint`)."""
        agg = msg.aggregator
        wire = {"aggregator": agg, "amount": msg.amount, "id": msg.id}
        done = self._s.token_ops.get(("fund", agg, msg.id))
        if done is not None:
            if done != ("", msg.amount):
                raise MarketError("conflict", f"fund id {msg.id!r} of {agg} minted {done[1]} already")
            return {"fund": wire, "tokens": self.tokens(agg), "duplicate": True}
        if self._s.supply + msg.amount > MAX_SUPPLY:
            raise MarketError("invalid", f"at most {MAX_SUPPLY} micro may be minted in all ({self._s.supply} so far)")
        self._s.supply += msg.amount
        self._s.tokens[agg] = self.tokens(agg) + msg.amount
        self._s.token_ops[("fund", agg, msg.id)] = ("", msg.amount)
        self._s.records.append(FlexTokenRecord(f"fund/{agg}/{msg.id}", msg.id, "", agg, msg.amount, "fund", now))
        notice = {"event": "fund", "id": msg.id, "from": "", "to": agg, "amount": msg.amount}
        self._emit(agg, "flex.tokens", notice | {"tokens": self.tokens(agg)})
        return {"fund": wire, "tokens": self.tokens(agg)}

    def transfer(self, sender: str, msg: TransferMsg, now: int) -> dict[str, Any]:
        """Move `amount` of the sender's own tokens to `to` (ERC20 `transfer`); refused,
        changing nothing, if it would overdraw what the sender may spend."""
        wire = {"from": sender, "to": msg.to, "amount": msg.amount, "id": msg.id}
        done = self._s.token_ops.get(("transfer", sender, msg.id))
        if done is not None:
            if done != (msg.to, msg.amount):
                raise MarketError("conflict", f"transfer id {msg.id!r} was used for another transfer")
            return {"transfer": wire, "tokens": self.tokens(sender), "duplicate": True}
        if msg.to == sender:
            raise MarketError("invalid", "a transfer to oneself")
        if msg.amount > self.available(sender):
            held = f"insufficient tokens: {sender} holds {self.tokens(sender)}"
            if self.reserved(sender):
                held += f" ({self.reserved(sender)} reserved for allocated requests)"
            raise MarketError("invalid", f"{held}, cannot transfer {msg.amount}")
        self._s.tokens[sender] = self.tokens(sender) - msg.amount
        self._s.tokens[msg.to] = self.tokens(msg.to) + msg.amount
        self._s.token_ops[("transfer", sender, msg.id)] = (msg.to, msg.amount)
        rid = f"transfer/{sender}/{msg.id}"
        self._s.records.append(FlexTokenRecord(rid, msg.id, sender, msg.to, msg.amount, "transfer", now))
        notice = {"event": "transfer", "id": msg.id, "from": sender, "to": msg.to, "amount": msg.amount}
        self._emit(msg.to, "flex.tokens", notice | {"tokens": self.tokens(msg.to)})
        return {"transfer": wire, "tokens": self.tokens(sender)}

    # -- requests ------------------------------------------------------------------------

    def eligible(self, aggregator: str, direction: Direction, start: int, end: int, now: int) -> list[Contract]:
        """Active contracts of the aggregator that can serve the window, oldest first: some
        flexibility in the direction, long enough, notice short enough, valid until `end`,
        and their prosumer not allocated in an overlapping window still unsettled."""
        busy: set[str] = set()
        for r in self._s.requests.values():
            if r.status == "allocated" and r.start < end and start < r.end:
                busy.update(a.prosumer for a in self.allotments(r.id) if a.status == "allocated")
        forecast = self.choice_of(aggregator).forecast
        out = [
            c
            for c in (self._s.contracts[cid] for cid in self._s.active.values())
            if c.aggregator == aggregator
            and c.capacity(direction) > 0
            and (not forecast or self._capacity(c, direction, start, end, forecast) > 0)
            and c.duration >= end - start
            and start - now >= c.notice
            and c.expires >= end
            and c.prosumer not in busy
        ]
        return sorted(out, key=lambda c: c.seq)

    def open_request(self, dso: str, msg: RequestMsg, now: int, reachable: Collection[str] | None = None) -> Opened:
        """Open a request and offer it to the eligible prosumers (those in `reachable`, if
        given). Only one request is open at a time; `allocate` closes it."""
        if msg.id is not None:
            rid = self._s.client_ids.get((dso, msg.id))
            if rid is not None:
                old = self._s.requests[rid]
                if not old.same_ask(msg):
                    raise MarketError("conflict", f"request id {msg.id!r} was used for another request")
                if old.status == "open":
                    raise MarketError("unavailable", f"request {rid!r} is still collecting answers")
                return Opened(old, {"request": self.request_wire(old, as_allocated=True), "duplicate": True})
        if self._s.open_request is not None:
            raise MarketError("unavailable", f"request {self._s.open_request!r} is being handled: one at a time")
        if msg.power == 0:
            raise MarketError("invalid", "power must not be 0")
        slot = self.config.slot
        if not msg.start < msg.end or msg.start % slot or msg.end % slot:
            raise MarketError("invalid", f"[start, end] must be a non-empty window aligned to {slot} s")
        if msg.end - msg.start > self.config.max_window:
            raise MarketError("invalid", f"the window is longer than {self.config.max_window} s")
        if msg.start < now:
            raise MarketError("closed", f"the window starts before now ({now})")
        if len(self._s.requests) >= self.config.max_requests:
            raise MarketError("too_large", f"at most {self.config.max_requests} requests")
        direction: Direction = "up" if msg.power > 0 else "down"
        offered = tuple(
            c.prosumer
            for c in self.eligible(msg.aggregator, direction, msg.start, msg.end, now)
            if reachable is None or c.prosumer in reachable
        )
        rid = f"fr{self._s.next_request}"
        self._s.next_request += 1
        request = Request(
            id=rid,
            dso=dso,
            aggregator=msg.aggregator,
            client_id=msg.id,
            power=msg.power,
            start=msg.start,
            end=msg.end,
            strategy=self.strategy_of(msg.aggregator),
            offered=offered,
        )
        self._s.requests[rid] = request
        self._s.offered_to[rid] = frozenset(offered)
        if msg.id is not None:
            self._s.client_ids[(dso, msg.id)] = rid
        self._s.open_request = rid
        within = msg.answer_within if msg.answer_within is not None else self.config.answer_timeout
        for pid in offered:
            c = self._s.contracts[self._s.active[pid]]
            self._emit(
                pid,
                "flex.offer",
                {
                    "request": rid,
                    "aggregator": msg.aggregator,
                    "direction": direction,
                    "power": msg.power,
                    "start": msg.start,
                    "end": msg.end,
                    "answer_within": within,
                    "capacity": c.capacity(direction),
                    "price": c.price(direction),
                },
            )
        return Opened(request)

    def collecting(self) -> str | None:
        """The request still collecting answers, if any (one at a time)."""
        return self._s.open_request

    def abandon(self, request_id: str) -> None:
        """Forget the open request (its allocation could not be stored): the next may open."""
        if self._s.open_request == request_id:
            self._s.open_request = None
            self._s.requests.pop(request_id, None)
            self._s.offered_to.pop(request_id, None)
            self._s.client_ids = {k: v for k, v in self._s.client_ids.items() if v != request_id}

    def pending(self, request_id: str) -> list[str]:
        """Offered prosumers that have not answered the open request yet."""
        r = self._s.requests.get(request_id)
        if r is None or r.status != "open":
            return []
        return [p for p in r.offered if (r.id, p) not in self._s.answers]

    def answer(self, prosumer: str, msg: AnswerMsg, now: int) -> dict[str, Any]:
        r = self._s.requests.get(msg.request)
        if r is None or prosumer not in self._s.offered_to.get(r.id, ()):
            raise MarketError("not_found", f"no request {msg.request!r} was offered to you")
        given: Answer = "accept" if msg.accept else "decline"
        first = self._s.answers.get((r.id, prosumer))
        if first is not None and first != "silent":
            if first != given:
                raise MarketError("conflict", f"you already answered {first!r}")
            return {"answer": given, "duplicate": True}
        if r.status != "open":
            raise MarketError("closed", f"request {r.id!r} no longer takes answers")
        self._s.answers[(r.id, prosumer)] = given
        self._s.records.append(FlexAnswerRecord(f"{r.id}.{prosumer}", r.id, prosumer, given, now))
        if msg.accept:
            self._reputation(prosumer, "participation", self.config.reputation.participation, r.id, now)
        return {"answer": given}

    def allocate(self, request_id: str, now: int) -> dict[str, Any]:
        """Close the answers of the open request (the silent declined) and allocate it."""
        r = self.request(request_id)
        if r.status != "open":
            raise MarketError("closed", f"request {r.id!r} is already allocated")
        choice = self.choice_of(r.aggregator)
        if choice.name != r.strategy:  # the aggregator chose another since the request opened
            choice = StrategyChoice(r.strategy, forecast=self.config.forecast)
        candidates: list[Candidate] = []
        contracts: dict[str, Contract] = {}
        for pid in r.offered:
            ans = self._s.answers.get((r.id, pid))
            if ans is None:
                self._s.answers[(r.id, pid)] = "silent"
                self._s.records.append(FlexAnswerRecord(f"{r.id}.{pid}", r.id, pid, "silent", now))
                continue
            c = self.active_contract(pid)
            if ans != "accept" or c is None or c.aggregator != r.aggregator:
                continue  # declined, or the contract ended while answering
            contracts[pid] = c
            candidates.append(
                Candidate(
                    pid,
                    self._capacity(c, r.direction, r.start, r.end, choice.forecast),
                    self.reputation(pid),
                    c.price(r.direction),
                    c.seq,
                    contracted=c.capacity(r.direction),
                    source=c.source,
                    trust=self.trust(pid),
                )
            )
        strategy = self._strategy(choice)
        result = strategy.allocate(r.need, candidates)
        for share in result.shares:
            c = contracts[share.prosumer]
            if share.power > c.capacity(r.direction):
                raise AssertionError(f"strategy {strategy.name} gave {share.prosumer} more than its contract")
        available = self.available(r.aggregator)
        kept, unpaid, trimmed = self._within_budget(r, result.shares, contracts, available)
        budget_reason = None
        if trimmed:
            budget_reason = (
                f"budget: {r.aggregator} has {available} micro available, which pays for "
                f"{result.allocated - trimmed} W of the {result.allocated} W allocated"
            )
        sign = 1 if r.power > 0 else -1
        order: list[str] = []
        for share in kept:
            c = contracts[share.prosumer]
            a = Allotment(
                r.id,
                share.prosumer,
                c.id,
                "allocated",
                sign * share.power,
                energy_wh(share.power, r.seconds),
                energy_wh(c.baseline_w, r.seconds),
                c.price(r.direction),
                self.reputation(share.prosumer),
            )
            self._s.allotments[(r.id, a.prosumer)] = a
            self._reserve(r.aggregator, amount(a.expected, a.price))
            order.append(a.prosumer)
            self._s.records.append(a.record(now))
            self._emit(
                a.prosumer,
                "flex.allocation",
                {
                    "request": r.id,
                    "contract": c.id,
                    "power": a.power,
                    "start": r.start,
                    "end": r.end,
                    "expected_wh": a.expected,
                    "baseline_wh": a.baseline,
                    "price": a.price,
                },
            )
        ranked_out = f"not needed: the request is covered by prosumers ranked higher ({r.strategy})"
        for pid, why in [(p, ranked_out) for p in result.displaced] + [(p, budget_reason or "") for p in unpaid]:
            c = contracts[pid]
            a = Allotment(r.id, pid, c.id, "displaced", 0, 0, 0, c.price(r.direction), self.reputation(pid))
            self._s.allotments[(r.id, pid)] = a
            order.append(pid)
            self._s.records.append(a.record(now))
            self._emit(pid, "flex.displaced", {"request": r.id, "reason": why})
        if not result.shares and not result.displaced and not r.offered:
            reason: str | None = "no eligible prosumer is reachable"
        else:
            reason = "; ".join(x for x in (result.reason, budget_reason) if x) or None
        new = msgspec.structs.replace(
            r,
            status="allocated",
            accepted=len(candidates),
            allocated=result.allocated - trimmed,
            shortfall=result.shortfall + trimmed,
            reason=reason,
        )
        self._s.requests[r.id] = new
        # Allotments are kept (and listed) in contract order, the order of the offer: what
        # the ledger rebuilds after a restart. The strategy's ranking decided who got what.
        have = set(order)
        self._s.by_request[r.id] = tuple(p for p in r.offered if p in have)
        self._s.open_request = None
        self._s.records.append(new.record(now))
        if not kept:
            self._settle(new, now)  # nothing to deliver: settled at once
        return {"request": self.request_wire(self._s.requests[r.id])}

    def _within_budget(
        self, r: Request, shares: Sequence[Share], contracts: Mapping[str, Contract], available: int
    ) -> tuple[list[Share], list[str], int]:
        """The strategy's shares, in its order, as far as the aggregator's available tokens
        pay for their largest possible reward (the expected energy at the contract price):
        the first share that does not fit is cut to what is left, the rest get nothing.
        Returns (shares kept, prosumers left out, W cut)."""
        left = available
        kept: list[Share] = []
        unpaid: list[str] = []
        trimmed = 0
        for share in shares:
            price = contracts[share.prosumer].price(r.direction)
            power = share.power
            if amount(energy_wh(power, r.seconds), price) > left:
                power = _affordable(power, r.seconds, price, left)
            trimmed += share.power - power
            if power > 0:
                kept.append(Share(share.prosumer, power))
                left -= amount(energy_wh(power, r.seconds), price)
            else:
                unpaid.append(share.prosumer)
        return kept, unpaid, trimmed

    # -- delivery ------------------------------------------------------------------------

    def meter(self, prosumer: str, msg: FlexMeterMsg, now: int) -> dict[str, Any]:
        """A prosumer's energy over an allocated window; the last missing one settles it."""
        r = self._s.requests.get(msg.request)
        a = self._s.allotments.get((msg.request, prosumer))
        if r is None or a is None or a.status != "allocated":
            raise MarketError("not_found", f"you have no allocation in request {msg.request!r}")
        if tuple(msg.time_interval) != (r.start, r.end):
            raise MarketError("invalid", f"time_interval must be the request's window [{r.start}, {r.end}]")
        reading = (msg.production, msg.consumption)
        first = self._s.readings.get((r.id, prosumer))
        if first is not None:
            if first != reading:
                raise MarketError("conflict", "a different reading for this window was already accepted")
            return {"duplicate": True}
        if r.status == "settled":
            raise MarketError("closed", f"request {r.id!r} is already settled")
        if now < r.end:
            raise MarketError("invalid", f"the window ends at {r.end}: meter it afterwards (now {now})")
        unread = self._unread.get(r.id)
        if unread is None:
            allocated = (
                p for p in self._s.by_request.get(r.id, ()) if self._s.allotments[(r.id, p)].status == "allocated"
            )
            unread = sum(1 for p in allocated if (r.id, p) not in self._s.readings)
        self._s.readings[(r.id, prosumer)] = reading
        self._unread[r.id] = unread - 1
        if not self._unread[r.id]:
            self._settle(r, now)
            return {"settled": True}
        return {"settled": False}

    def settle(self, by: str, msg: RequestRefMsg, now: int) -> dict[str, Any]:
        """Settle a request after its window, readings missing or not (missing: not delivered)."""
        r = self._s.requests.get(msg.request)
        if r is None or by not in (r.aggregator, r.dso):
            raise MarketError("not_found", f"unknown request {msg.request!r}")
        if r.status == "settled":
            raise MarketError("closed", f"request {r.id!r} is already settled")
        if r.status == "open":
            raise MarketError("invalid", f"request {r.id!r} is still collecting answers")
        if now < r.end:
            raise MarketError("invalid", f"the window ends at {r.end} (now {now})")
        self._settle(r, now)
        return {"request": self.request_wire(self._s.requests[r.id])}

    def _settle(self, r: Request, now: int) -> None:
        rules = self.config.reputation
        for a in self.allotments(r.id):
            if a.status != "allocated":
                continue
            reading = self._s.readings.get((r.id, a.prosumer))
            check = check_delivery(
                power=a.power,
                seconds=r.seconds,
                baseline=a.baseline,
                price=a.price,
                reading=reading,
                margin_pct=self.config.margin_pct,
                penalty_rate=self.config.penalty_rate,
            )
            production, consumption = reading if reading is not None else (0, 0)
            self._s.records.append(
                FlexDeliveryRecord(
                    id=f"{r.id}.{a.prosumer}",
                    request_id=r.id,
                    prosumer_id=a.prosumer,
                    metered=reading is not None,
                    production=production,
                    consumption=consumption,
                    baseline=check.baseline,
                    expected=check.expected,
                    delivered=check.delivered,
                    met=check.met,
                    reward=check.reward,
                    penalty=check.penalty,
                    time=now,
                )
            )
            # The reward comes out of the allocation's reservation (credited <= expected);
            # the penalty is collected as far as the prosumer holds tokens, after its reward.
            self._reserve(r.aggregator, -amount(a.expected, a.price))
            self._transfer(r.id, r.aggregator, a.prosumer, check.reward, "reward", a.prosumer, now)
            paid = min(check.penalty, self.tokens(a.prosumer))
            self._transfer(r.id, a.prosumer, r.aggregator, paid, "penalty", a.prosumer, now)
            n, ratios = self._s.history.get(a.prosumer, (0, 0))
            self._s.history[a.prosumer] = (n + 1, ratios + delivery_ratio(check.met, check.credited, check.expected))
            if check.met:
                score = self._reputation(a.prosumer, "compliance", rules.compliance, r.id, now)
            else:
                score = self._reputation(a.prosumer, "penalty", -rules.penalty, r.id, now)
            d = Delivery(r.id, a.prosumer, reading is not None, production, consumption, check, score, paid)
            self._s.deliveries[(r.id, a.prosumer)] = d
            self._emit(a.prosumer, "flex.delivery", {**d.wire(), "tokens": self.tokens(a.prosumer)})
        settled = msgspec.structs.replace(r, status="settled")
        self._s.requests[r.id] = settled
        self._unread.pop(r.id, None)
        summary = self.request_wire(settled)
        self._emit(r.aggregator, "flex.settled", {"request": summary})
        if r.dso != r.aggregator:
            self._emit(r.dso, "flex.settled", {"request": summary})

    # -- results -------------------------------------------------------------------------

    def request_wire(self, r: Request, as_allocated: bool = False) -> dict[str, Any]:
        """The request `R` of docs/flexibility.md; `as_allocated`: as it was when allocated
        (the first reply to the dso: before any delivery), whatever happened since."""
        answers = {p: self._s.answers.get((r.id, p)) for p in r.offered}
        allotted = self.allotments(r.id)
        deliveries = [d for d in (self._s.deliveries.get((r.id, a.prosumer)) for a in allotted) if d is not None]
        status = r.status
        if as_allocated and status == "settled":
            deliveries = []
            status = "allocated" if any(a.status == "allocated" for a in allotted) else "settled"
        return {
            "id": r.id,
            "dso": r.dso,
            "aggregator": r.aggregator,
            "power": r.power,
            "start": r.start,
            "end": r.end,
            "strategy": r.strategy,
            "status": status,
            "offered": list(r.offered),
            "accepted": [p for p, a in answers.items() if a == "accept"],
            "declined": [p for p, a in answers.items() if a == "decline"],
            "silent": [p for p, a in answers.items() if a == "silent"],
            "allocations": [
                {"prosumer": a.prosumer, "power": a.power, "expected_wh": a.expected, "baseline_wh": a.baseline}
                for a in allotted
                if a.status == "allocated"
            ],
            "displaced": [a.prosumer for a in allotted if a.status == "displaced"],
            "allocated": r.allocated,
            "shortfall": r.shortfall,
            "reason": r.reason,
            "requested_wh": energy_wh(r.need, r.seconds),
            "expected_wh": sum(a.expected for a in allotted),
            "delivered_wh": sum(d.check.credited for d in deliveries),
            "met": sum(1 for d in deliveries if d.check.met),
            "failed": sum(1 for d in deliveries if not d.check.met),
            "rewards": sum(d.check.reward for d in deliveries),
            "penalties": sum(d.check.penalty for d in deliveries),
            "penalties_paid": sum(d.penalty_paid for d in deliveries),
            "deliveries": [d.wire() for d in deliveries],
        }

    def results(self, by: str, msg: ResultsMsg) -> dict[str, Any]:
        """Aggregated results of the requests `by` made (dso) or received (aggregator): the
        one named, or a page of all of them in request order (ids never change, restarts
        included): the first, or the one after the request `msg.after`. A page holds at most
        `msg.limit` requests offered to at most RESULTS_PAGE_PROSUMERS prosumers in all (at
        least one request); `next` names its last request while others follow, else None.
        `totals` are those of the requests in the reply."""
        nxt: str | None = None
        if msg.request is not None:
            if msg.after is not None:
                raise MarketError("invalid", "`after` pages through all requests: not with `request`")
            r = self._s.requests.get(msg.request)
            if r is None or by not in (r.dso, r.aggregator):
                raise MarketError("not_found", f"unknown request {msg.request!r}")
            chosen = [r]
        else:
            mine = [r for r in self._s.requests.values() if by in (r.dso, r.aggregator)]
            start = 0
            if msg.after is not None:
                start = next((i + 1 for i, r in enumerate(mine) if r.id == msg.after), -1)
                if start < 0:
                    why = f"unknown cursor: after={msg.after!r} is none of your requests (pass a reply's `next`)"
                    raise MarketError("invalid", why)
            chosen, offered = [], 0
            for r in mine[start:]:
                if len(chosen) == msg.limit or (chosen and offered + len(r.offered) > RESULTS_PAGE_PROSUMERS):
                    nxt = chosen[-1].id
                    break
                chosen.append(r)
                offered += len(r.offered)
        wires = [self.request_wire(r) for r in chosen]
        totals = {
            key: sum(w[key] for w in wires)
            for key in ("requested_wh", "expected_wh", "delivered_wh", "met", "failed", "rewards", "penalties")
        }
        return {"requests": wires, "totals": {"requests": len(wires), **totals}, "next": nxt}

    def status(self, pid: str, roles: str | Collection[str]) -> dict[str, Any]:
        """A prosumer's own contract and standing; an aggregator's contracts, prosumers and
        budget; the operator's view of the token: supply and every non-zero balance. An id
        holding several roles gets the operator's and the aggregator's views together (their
        fields differ); the prosumer's view only when it holds neither (`tokens` is in both)."""
        held = {roles} if isinstance(roles, str) else set(roles)
        out: dict[str, Any] = {}
        if "operator" in held:
            balances = {p: v for p, v in sorted(self._s.tokens.items()) if v}
            out |= {"supply": self._s.supply, "balances": balances}
        if "aggregator" in held:
            mine = self.contracts(pid)
            prosumers = sorted({c.prosumer for c in mine})
            out |= {
                "strategy": self.strategy_of(pid),
                "contracts": [c.wire() for c in mine],
                "prosumers": [self._standing(p) for p in prosumers],
                "tokens": self.tokens(pid),
                "reserved": self.reserved(pid),
                "available": self.available(pid),
            }
        if out:
            return out
        c = self.active_contract(pid)
        return {"contract": None if c is None else c.wire(), **self._standing(pid)}

    def _standing(self, pid: str) -> dict[str, Any]:
        return {"id": pid, "reputation": self.reputation(pid), "tokens": self.tokens(pid)}

    # -- resuming from the ledger --------------------------------------------------------

    def resume(self, records: Iterable[Record]) -> None:
        """Rebuild the state from the ledger's records (of `FLEX_RECORDS`, any order; what
        `take_outbox` produced in earlier runs): contracts, reputation, tokens, id counters,
        and every allocated request with its answers, allotments and deliveries, settled or
        not, so `results` and a retried request id answer as before the restart.

        Not in the ledger, so not rebuilt: an aggregator's `flex.strategy` choice (back to
        the default), a request still collecting answers (never acknowledged; its answers
        and their reputation stay, and its id is not reused), and the readings of requests
        not yet settled (they are sent again)."""
        by_type: dict[type[Record], list[Any]] = {cls: [] for cls in FLEX_RECORDS}
        for r in records:
            if type(r) in by_type:
                by_type[type(r)].append(r)
        contract_rows: list[FlexContractRecord] = by_type[FlexContractRecord]
        request_rows: list[FlexRequestRecord] = by_type[FlexRequestRecord]
        answer_rows: list[FlexAnswerRecord] = by_type[FlexAnswerRecord]
        allocation_rows: list[FlexAllocationRecord] = by_type[FlexAllocationRecord]
        delivery_rows: list[FlexDeliveryRecord] = by_type[FlexDeliveryRecord]
        token_rows: list[FlexTokenRecord] = by_type[FlexTokenRecord]
        reputation_rows: list[FlexReputationRecord] = by_type[FlexReputationRecord]
        s = _State()
        registered: dict[str, int] = {}  # contract id -> time of its registration
        for rec in sorted(contract_rows, key=lambda r: (_number(r.contract_id), r.version)):
            seq = _number(rec.contract_id)
            c = Contract.from_record(rec, seq)
            s.contracts[c.id] = c
            if rec.version == 1:
                registered[c.id] = rec.time
            if c.status == "active":
                s.active[c.prosumer] = c.id
            elif s.active.get(c.prosumer) == c.id:
                del s.active[c.prosumer]
            s.next_contract = max(s.next_contract, seq + 1)
        after_check: dict[tuple[str, str], int] = {}  # (request, prosumer) -> reputation after its delivery check
        for rep in sorted(reputation_rows, key=lambda r: (r.participant_id, _number(r.id))):
            s.reputation[rep.participant_id] = rep.score
            s.reputation_seq[rep.participant_id] = _number(rep.id)
            if rep.reason in ("compliance", "penalty"):
                after_check[(rep.ref, rep.participant_id)] = rep.score
        paid: dict[tuple[str, str], int] = {}  # (request, prosumer) -> penalty collected
        for t in token_rows:
            if t.from_id:
                s.tokens[t.from_id] = s.tokens.get(t.from_id, 0) - t.amount
            else:  # minted
                s.supply += t.amount
            s.tokens[t.to_id] = s.tokens.get(t.to_id, 0) + t.amount
            if t.reason == "fund":
                s.token_ops[("fund", t.to_id, t.request_id)] = ("", t.amount)
            elif t.reason == "transfer":
                s.token_ops[("transfer", t.from_id, t.request_id)] = (t.to_id, t.amount)
            elif t.reason == "penalty":
                paid[(t.request_id, t.from_id)] = t.amount
        answered: dict[str, list[FlexAnswerRecord]] = {}
        for ans in answer_rows:
            s.answers[(ans.request_id, ans.prosumer_id)] = _answer(ans.answer)
            answered.setdefault(ans.request_id, []).append(ans)
            s.next_request = max(s.next_request, _number(ans.request_id) + 1)  # an abandoned request's too
        allotted: dict[str, dict[str, FlexAllocationRecord]] = {}
        for a in allocation_rows:
            allotted.setdefault(a.request_id, {})[a.prosumer_id] = a
        delivered = {(d.request_id, d.prosumer_id): d for d in delivery_rows}
        contracts_of: dict[str, list[Contract]] = {}  # prosumer -> its contracts, oldest first
        reserved: dict[str, int] = {}
        for c in s.contracts.values():
            contracts_of.setdefault(c.prosumer, []).append(c)
        for req in sorted(request_rows, key=lambda r: _number(r.id)):
            mine = allotted.get(req.id, {})
            offered = _offer_order(req, answered.get(req.id, []), mine, contracts_of, registered)
            for p in mine:
                if p not in offered:
                    raise ValueError(f"request {req.id}: {p} has an allocation but was not offered")
            for a in mine.values():
                status: Literal["allocated", "displaced"] = "allocated" if a.status == "allocated" else "displaced"
                s.allotments[(req.id, a.prosumer_id)] = Allotment(
                    req.id, a.prosumer_id, a.contract_id, status, a.power, a.expected, a.baseline, a.price, a.reputation
                )
                d = delivered.get((req.id, a.prosumer_id))
                if status != "allocated":
                    continue
                if d is None:  # to deliver: its reward is reserved
                    reserved[req.aggregator_id] = reserved.get(req.aggregator_id, 0) + amount(a.expected, a.price)
                    continue
                credited = min(max(d.delivered, 0), d.expected)
                check = DeliveryCheck(d.expected, d.baseline, d.delivered, credited, d.met, d.reward, d.penalty)
                score = after_check.get((req.id, d.prosumer_id), self.config.reputation.initial)
                s.deliveries[(req.id, d.prosumer_id)] = Delivery(
                    req.id,
                    d.prosumer_id,
                    d.metered,
                    d.production,
                    d.consumption,
                    check,
                    score,
                    paid.get((req.id, d.prosumer_id), 0),
                )
                n, ratios = s.history.get(d.prosumer_id, (0, 0))
                s.history[d.prosumer_id] = (n + 1, ratios + delivery_ratio(d.met, credited, d.expected))
                if d.metered:
                    s.readings[(req.id, d.prosumer_id)] = (d.production, d.consumption)
            settled = all((req.id, p) in delivered for p, a in mine.items() if a.status == "allocated")
            s.requests[req.id] = Request(
                id=req.id,
                dso=req.dso_id,
                aggregator=req.aggregator_id,
                client_id=req.client_id,
                power=req.power,
                start=req.time_delivery_start,
                end=req.time_delivery_end,
                strategy=req.strategy,
                offered=offered,
                status="settled" if settled else "allocated",
                accepted=req.accepted,
                allocated=req.allocated,
                shortfall=req.shortfall,
                reason=req.reason,
            )
            s.by_request[req.id] = tuple(p for p in offered if p in mine)
            s.offered_to[req.id] = frozenset(offered)
            if req.client_id is not None:
                s.client_ids[(req.dso_id, req.client_id)] = req.id
            s.next_request = max(s.next_request, _number(req.id) + 1)
        s.reserved = {agg: v for agg, v in reserved.items() if v}
        self._s = s
        self._expiry_floor = None
        self._unread = {}


def _affordable(power: int, seconds: int, price: float, budget: int) -> int:
    """The largest W <= `power` whose energy over `seconds` costs at most `budget` micro at
    `price` (cost grows with power: a binary search)."""
    lo, hi = 0, power
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if amount(energy_wh(mid, seconds), price) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo if energy_wh(lo, seconds) > 0 else 0  # no allocation of nothing


def _offer_order(
    req: FlexRequestRecord,
    answers: Sequence[FlexAnswerRecord],
    allotted: Mapping[str, FlexAllocationRecord],
    contracts_of: Mapping[str, Sequence[Contract]],
    registered: Mapping[str, int],
) -> tuple[str, ...]:
    """The offered prosumers of a request (each has an answer row: accept, decline or
    silent) in the order of the offer: their contracts' order. A prosumer's contract is its
    allocation's, else its latest with that aggregator registered by the time it answered."""

    def contract_seq(ans: FlexAnswerRecord) -> int:
        a = allotted.get(ans.prosumer_id)
        if a is not None:
            return _number(a.contract_id)
        mine = [c for c in contracts_of.get(ans.prosumer_id, ()) if c.aggregator == req.aggregator_id]
        known = [c for c in mine if registered.get(c.id, ans.time) <= ans.time] or mine
        return known[-1].seq if known else 0

    return tuple(a.prosumer_id for a in sorted(answers, key=lambda a: (contract_seq(a), a.prosumer_id)))


_ANSWERS: dict[str, Answer] = {"accept": "accept", "decline": "decline", "silent": "silent"}


def _answer(text: str) -> Answer:
    found = _ANSWERS.get(text)
    if found is None:
        raise ValueError(f"unknown answer {text!r} in the ledger")
    return found


def _number(text: str) -> int:
    """The trailing integer of an id (`fc12` -> 12, `P1.7` -> 7)."""
    digits = ""
    for ch in reversed(text):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits) if digits else 0


def _terms(c: Contract) -> tuple[Any, ...]:
    return (
        c.aggregator,
        c.source,
        c.production,
        c.consumption,
        c.flex_up,
        c.flex_down,
        c.duration,
        c.notice,
        c.price_up,
        c.price_down,
        c.expires,
    )


def _terms_of(msg: ContractRegisterMsg) -> tuple[Any, ...]:
    return (
        msg.aggregator,
        msg.source,
        msg.production,
        msg.consumption,
        msg.flex_up,
        msg.flex_down,
        msg.duration,
        msg.notice,
        msg.price_up,
        msg.price_down,
        msg.expires,
    )
