"""EAF balancing (seed 002, PROTOCOL.md namespace `/balancing`) as a pure core.

Assets carry a balance rule (`from`: who balances them, `to`: where their energy goes),
PPAs (contracts) bind an asset to a partner, and meter settlements report energy per
(meter, epoch). Sealing an asset's epoch derives its transactions:

1. metered values first: the energy metered at the asset plus what the sealed balances
   of other assets delivered to it in that epoch (its *received* energy) moves on along
   `balancerule.to`;
2. then the asset's active contracts in merit order (priority ascending, then age): each
   is served `min(energy, load_max, energy still unserved of the received)`, or not at all
   when that is below `load_min`; a `to` contract delivers asset -> partner and the asset
   draws the same energy from `balancerule.from` (without a `from` rule the delivery comes
   out of the received energy, which then moves on along `to` reduced by it); a `from`
   contract delivers partner -> asset and the asset passes it on along `to`.

A sealed epoch is final: settlements (and transfers from assets sealed later) that arrive
after it are kept apart as `late` and never change it. The `seal` is the sha256 hex of a
canonical JSON of (assetId, epoch, transactions), so anyone holding the transactions can
check it (`verify_seal`). Nothing here touches a socket, clock or database: methods return
replies, balances and ledger records; the namespace handler stores and emits them.

Every accepted change is also one journal record (`BalanceEventRecord`, in the order
accepted) left in an outbox (`take_records`); `restore(records)` rebuilds the whole state
from the journal and the seal rows, so a restarted server continues where the ledger ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from market.balancing.messages import (
    AddSettlementMsg,
    AssetUpsertMsg,
    BalanceRefMsg,
    ContractAddMsg,
    ContractCancelMsg,
    ContractUpdateMsg,
)
from market.balancing.seals import seal_of, verify_seal
from market.balancing.state import Asset, Balance, BalancingConfig, Contract, Flow, LateEntry, _Reading
from market.core.errors import MarketError
from market.core.records import BalanceEventRecord, BalanceSeal, BalanceTransaction, MeterRecord, Record

# The ledger records `Balancing.restore` rebuilds the state from.
BALANCING_RECORDS: tuple[type[Record], ...] = (BalanceEventRecord, BalanceSeal, BalanceTransaction)

# Journal event -> the message its payload holds.
EVENT_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "asset.upsert": AssetUpsertMsg,
    "contract.add": ContractAddMsg,
    "contract.update": ContractUpdateMsg,
    "contract.cancel": ContractCancelMsg,
    "balancing.addSettlement": AddSettlementMsg,
    "balancing.seal": BalanceRefMsg,
}

# -- the core --------------------------------------------------------------------------------


class Balancing:
    """Assets, contracts, settlements and sealed balances of one market operator."""

    def __init__(self, config: BalancingConfig | None = None) -> None:
        self.config = config or BalancingConfig()
        self._assets: dict[str, Asset] = {}
        self._contracts: dict[str, Contract] = {}
        self._next_contract = 1
        # (meter, epoch) -> label ("" if none) -> reading, in arrival order
        self._settlements: dict[tuple[str, int], dict[str, _Reading]] = {}
        self._n_settlements = 0
        self._sealed: dict[tuple[str, int], Balance] = {}
        self._inflows: dict[tuple[str, int], list[Flow]] = {}  # from sealed balances, on time
        self._late: dict[tuple[str, int], list[LateEntry]] = {}
        self._seq = 0  # journal: the last event's number
        self._outbox: list[Record] = []  # ledger records not yet taken by the caller

    # -- epochs --------------------------------------------------------------------------

    def epoch_interval(self, epoch: int) -> tuple[int, int]:
        d = self.config.epoch_duration
        return (epoch * d, (epoch + 1) * d)

    def epoch_of(self, t: int) -> int:
        return t // self.config.epoch_duration

    # -- assets and contracts ------------------------------------------------------------

    def upsert_asset(self, msg: AssetUpsertMsg) -> dict[str, Any]:
        rule = msg.balancerule
        if msg.asset_id in (rule.from_, rule.to):
            raise MarketError("invalid", "an asset cannot be balanced from or to itself")
        if msg.asset_id not in self._assets and len(self._assets) >= self.config.max_assets:
            raise MarketError("too_large", f"at most {self.config.max_assets} assets")
        asset = Asset(msg.asset_id, rule.from_, rule.to)
        if self._assets.get(asset.id) != asset:  # the same rule again changes nothing
            self._assets[asset.id] = asset
            self._journal("asset.upsert", msg)
        return {"asset": asset.wire()}

    def asset(self, asset_id: str) -> Asset:
        found = self._assets.get(asset_id)
        if found is None:
            raise MarketError("not_found", f"unknown asset {asset_id!r}")
        return found

    def add_contract(self, msg: ContractAddMsg) -> dict[str, Any]:
        self.asset(msg.asset_id)
        if len(self._contracts) >= self.config.max_contracts:
            raise MarketError("too_large", f"at most {self.config.max_contracts} contracts")
        seq = self._next_contract
        contract = Contract(
            id=f"c{seq}",
            asset=msg.asset_id,
            partner=msg.partner_id,
            direction=msg.direction,
            status=msg.status,
            energy=msg.energy,
            load_min=msg.load_min,
            load_max=msg.load_max,
            balanced=msg.balanced,
            priority=msg.priority,
            seq=seq,
        )
        _check_contract(contract)
        self._next_contract += 1
        self._contracts[contract.id] = contract
        self._journal("contract.add", msg)
        return {"contract": contract.wire()}

    def update_contract(self, msg: ContractUpdateMsg) -> dict[str, Any]:
        old = self._contract(msg.id)
        if old.status == "cancelled":
            raise MarketError("closed", f"contract {msg.id!r} is cancelled")
        changes = {
            "partner": msg.partner_id,
            "energy": msg.energy,
            "load_min": msg.load_min,
            "load_max": msg.load_max,
            "balanced": msg.balanced,
            "priority": msg.priority,
        }
        new = msgspec.structs.replace(old, **{k: v for k, v in changes.items() if v is not None})
        _check_contract(new)
        if new != old:
            self._contracts[new.id] = new
            self._journal("contract.update", msg)
        return {"contract": new.wire()}

    def cancel_contract(self, msg: ContractCancelMsg) -> dict[str, Any]:
        old = self._contract(msg.id)
        if old.status == "cancelled":
            raise MarketError("closed", f"contract {msg.id!r} is already cancelled")
        new = self._contracts[old.id] = msgspec.structs.replace(old, status="cancelled")
        self._journal("contract.cancel", msg)
        return {"contract": new.wire()}

    def _contract(self, contract_id: str) -> Contract:
        found = self._contracts.get(contract_id)
        if found is None:
            raise MarketError("not_found", f"unknown contract {contract_id!r}")
        return found

    def contracts(self, asset_id: str | None = None) -> list[Contract]:
        """Every contract (of one asset), oldest first, cancelled ones included."""
        return [c for c in self._contracts.values() if asset_id is None or c.asset == asset_id]

    def merit_order(self, asset_id: str) -> list[Contract]:
        """The asset's active contracts in the order sealing serves them: priority, then age."""
        return sorted((c for c in self.contracts(asset_id) if c.status == "active"), key=Contract.merit_key)

    # -- settlements ---------------------------------------------------------------------

    def add_settlement(self, msg: AddSettlementMsg) -> dict[str, Any]:
        """Record a meter settlement; `late` when that meter's asset has sealed the epoch.

        One reading per (meter, epoch, label): the same again is a duplicate, other energy
        under the same key is a conflict. Readings with different labels add up."""
        key = (msg.meter_id, msg.epoch)
        label = msg.label or ""
        readings = self._settlements.get(key, {})
        first = readings.get(label)
        if first is not None:
            if first.consumption != msg.consumption:
                raise MarketError("conflict", f"a different settlement for {key} label {label!r} was already accepted")
            return {"late": first.late, "duplicate": True}
        if self._n_settlements >= self.config.max_settlements:
            raise MarketError("too_large", f"at most {self.config.max_settlements} settlements")
        late = key in self._sealed
        self._settlements.setdefault(key, {})[label] = _Reading(msg.consumption, late)
        self._n_settlements += 1
        if late:
            self._late.setdefault(key, []).append(LateEntry("settlement", msg.meter_id, msg.consumption, msg.label))
        self._journal("balancing.addSettlement", msg)
        return {"late": late}

    def metered(self, asset_id: str, epoch: int) -> int:
        """Energy metered at the asset in the epoch, late settlements excluded."""
        return sum(r.consumption for r in self._settlements.get((asset_id, epoch), {}).values() if not r.late)

    def received(self, asset_id: str, epoch: int) -> int:
        """Metered energy plus what sealed balances of other assets delivered to it (on time)."""
        return self.metered(asset_id, epoch) + sum(f.energy for f in self._inflows.get((asset_id, epoch), ()))

    # -- balances ------------------------------------------------------------------------

    def derive(self, asset_id: str, epoch: int) -> tuple[Flow, ...]:
        """The transactions sealing the asset's epoch would give now (see the module doc)."""
        asset = self.asset(asset_id)
        received = self.received(asset_id, epoch)
        unserved = received
        direct = 0  # `to` contracts served out of the received energy (asset without `from`)
        contract_flows: list[Flow] = []
        for c in self.merit_order(asset_id):
            served = min(c.energy, c.load_max, unserved)
            if served <= 0 or served < c.load_min:
                continue
            unserved -= served
            if c.direction == "to":
                contract_flows.append(Flow(asset_id, c.partner, served))
                if asset.from_ is not None:
                    contract_flows.append(Flow(asset.from_, asset_id, served))
                else:
                    direct += served
            else:
                contract_flows.append(Flow(c.partner, asset_id, served))
                if asset.to is not None:
                    contract_flows.append(Flow(asset_id, asset.to, served))
        onward = received - direct
        metered_flows = [Flow(asset_id, asset.to, onward)] if asset.to is not None and onward > 0 else []
        return (*metered_flows, *contract_flows)

    def balance(self, asset_id: str, epoch: int) -> Balance:
        """The sealed balance (with what arrived late), or a preview of sealing it now."""
        key = (asset_id, epoch)
        sealed = self._sealed.get(key)
        if sealed is not None:
            return msgspec.structs.replace(sealed, late=tuple(self._late.get(key, ())))
        self.asset(asset_id)
        return Balance(asset_id, epoch, self.epoch_interval(epoch), self.derive(asset_id, epoch))

    def is_sealed(self, asset_id: str, epoch: int) -> bool:
        return (asset_id, epoch) in self._sealed

    def propose_seal(self, asset_id: str, epoch: int) -> Balance:
        """The sealed balance, not yet committed: store its `records()`, then `commit_seal()`."""
        if (asset_id, epoch) in self._sealed:
            raise MarketError("closed", f"epoch {epoch} of {asset_id!r} is already sealed (balancing.get reads it)")
        self.asset(asset_id)
        flows = self.derive(asset_id, epoch)
        seal = seal_of(asset_id, epoch, (f.wire() for f in flows))
        return Balance(asset_id, epoch, self.epoch_interval(epoch), flows, seal)

    def commit_seal(self, balance: Balance) -> None:
        """Make a proposed seal final; its deliveries to other assets count for their epoch
        (or are late there, if that epoch is sealed already). Its `records()` and journal
        entry go to the outbox."""
        key = (balance.asset, balance.epoch)
        if balance.seal is None or key in self._sealed:
            raise MarketError("closed", f"epoch {balance.epoch} of {balance.asset!r} is already sealed")
        if balance != self.propose_seal(*key):
            raise MarketError("conflict", "the balance changed since the seal was proposed")
        self._apply_seal(balance)
        self._journal("balancing.seal", BalanceRefMsg(asset_id=balance.asset, epoch=balance.epoch))
        self._outbox.extend(self.records(balance))

    def _apply_seal(self, balance: Balance) -> None:
        key = (balance.asset, balance.epoch)
        self._sealed[key] = balance
        for flow in balance.transactions:
            if flow.to == balance.asset:
                continue
            target = (flow.to, balance.epoch)
            if target in self._sealed:
                self._late.setdefault(target, []).append(LateEntry("transfer", flow.from_, flow.energy))
            else:
                self._inflows.setdefault(target, []).append(flow)

    def seal(self, asset_id: str, epoch: int) -> Balance:
        balance = self.propose_seal(asset_id, epoch)
        self.commit_seal(balance)
        return balance

    def records(self, balance: Balance) -> tuple[Record, ...]:
        """Ledger rows of a sealed balance: one per transaction and one for the seal."""
        if balance.seal is None:
            raise ValueError("only a sealed balance has ledger records")
        start, end = balance.interval
        rows: list[Record] = [
            BalanceTransaction(
                id=f"b{balance.epoch}-{balance.asset}-{n}",
                asset_id=balance.asset,
                epoch=balance.epoch,
                epoch_start=start,
                epoch_end=end,
                seq=n,
                from_id=flow.from_,
                to_id=flow.to,
                energy=flow.energy,
                seal=balance.seal,
            )
            for n, flow in enumerate(balance.transactions)
        ]
        rows.append(
            BalanceSeal(
                id=f"s{balance.epoch}-{balance.asset}",
                asset_id=balance.asset,
                epoch=balance.epoch,
                epoch_start=start,
                epoch_end=end,
                transactions=len(balance.transactions),
                energy=sum(f.energy for f in balance.transactions),
                seal=balance.seal,
            )
        )
        return tuple(rows)

    def snapshot(self) -> dict[str, Any]:
        """Every piece of state as plain data (tests compare it to show nothing changed)."""
        state: dict[str, Any] = msgspec.to_builtins(
            {
                "assets": list(self._assets.values()),
                "contracts": list(self._contracts.values()),
                "next_contract": self._next_contract,
                "settlements": [[*k, list(v.items())] for k, v in self._settlements.items()],
                "n_settlements": self._n_settlements,
                "sealed": list(self._sealed.values()),
                "inflows": [[*k, v] for k, v in self._inflows.items()],
                "late": [[*k, v] for k, v in self._late.items()],
                "seq": self._seq,
            }
        )
        return state

    # -- journal, undo and restore -------------------------------------------------------

    def _journal(self, event: str, msg: msgspec.Struct) -> None:
        self._seq += 1
        payload = msgspec.json.encode(msg).decode()
        self._outbox.append(BalanceEventRecord(id=f"e{self._seq}", seq=self._seq, event=event, payload=payload))

    def take_records(self) -> list[Record]:
        """Ledger records produced since the last call: journal entries and seal rows."""
        records, self._outbox = self._outbox, []
        return records

    def checkpoint(self) -> _Checkpoint:
        """The whole state, to `rollback` to when the records of an event cannot be stored."""
        return _Checkpoint(
            assets=dict(self._assets),
            contracts=dict(self._contracts),
            next_contract=self._next_contract,
            settlements={k: dict(v) for k, v in self._settlements.items()},
            n_settlements=self._n_settlements,
            sealed=dict(self._sealed),
            inflows={k: list(v) for k, v in self._inflows.items()},
            late={k: list(v) for k, v in self._late.items()},
            seq=self._seq,
            outbox=list(self._outbox),
        )

    def rollback(self, saved: _Checkpoint) -> None:
        self._assets = dict(saved.assets)
        self._contracts = dict(saved.contracts)
        self._next_contract = saved.next_contract
        self._settlements = {k: dict(v) for k, v in saved.settlements.items()}
        self._n_settlements = saved.n_settlements
        self._sealed = dict(saved.sealed)
        self._inflows = {k: list(v) for k, v in saved.inflows.items()}
        self._late = {k: list(v) for k, v in saved.late.items()}
        self._seq = saved.seq
        self._outbox = list(saved.outbox)

    def restore(self, records: Iterable[Record]) -> None:
        """Rebuild the state from the ledger's records (of `BALANCING_RECORDS`, any order):
        the journal is replayed in order; a seal takes its balance as stored (`BalanceSeal`
        and its `BalanceTransaction` rows, checked against the seal), so a sealed epoch stays
        sealed exactly as published. Seals without a journal entry (a ledger written before
        the journal) are restored after it, as stored. Records that do not fit together
        raise ValueError and change nothing."""
        events: list[BalanceEventRecord] = []
        seals: dict[tuple[str, int], BalanceSeal] = {}
        rows: dict[tuple[str, int], list[BalanceTransaction]] = {}
        for r in records:
            if isinstance(r, BalanceEventRecord):
                events.append(r)
            elif isinstance(r, BalanceSeal):
                seals[(r.asset_id, r.epoch)] = r
            elif isinstance(r, BalanceTransaction):
                rows.setdefault((r.asset_id, r.epoch), []).append(r)
        orphans = sorted(set(rows) - set(seals))
        if orphans:
            raise ValueError(f"balance transactions without a seal: {orphans}")
        stored = {key: _stored_balance(seal, rows.get(key, [])) for key, seal in seals.items()}
        events.sort(key=lambda e: e.seq)
        if len({e.seq for e in events}) != len(events):
            raise ValueError("the balancing journal numbers two events alike")
        core = Balancing(self.config)
        for event in events:
            try:
                core._replay(event, stored)
            except (MarketError, msgspec.ValidationError, msgspec.DecodeError) as err:
                raise ValueError(f"journal event {event.id} ({event.event}) does not replay: {err}") from err
        for key in sorted(set(stored) - set(core._sealed), key=lambda k: (k[1], k[0])):
            core._apply_seal(stored[key])
        core._seq = max([core._seq, *(e.seq for e in events)])
        core._outbox = []
        self.rollback(core.checkpoint())

    def _replay(self, event: BalanceEventRecord, stored: dict[tuple[str, int], Balance]) -> None:
        kind = EVENT_MESSAGES.get(event.event)
        if kind is None:
            raise ValueError(f"journal event {event.id}: unknown event {event.event!r}")
        msg = msgspec.json.decode(event.payload, type=kind)
        self._seq = event.seq - 1  # the replayed event gets its own number again
        if isinstance(msg, AssetUpsertMsg):
            self.upsert_asset(msg)
        elif isinstance(msg, ContractAddMsg):
            self.add_contract(msg)
        elif isinstance(msg, ContractUpdateMsg):
            self.update_contract(msg)
        elif isinstance(msg, ContractCancelMsg):
            self.cancel_contract(msg)
        elif isinstance(msg, AddSettlementMsg):
            self.add_settlement(msg)
        elif isinstance(msg, BalanceRefMsg):
            key = (msg.asset_id, msg.epoch)
            balance = stored.get(key)
            if balance is None:
                raise ValueError(f"journal event {event.id} seals {key}, but the ledger has no such seal")
            if key in self._sealed:
                raise ValueError(f"journal event {event.id} seals {key} a second time")
            self.asset(msg.asset_id)
            self._apply_seal(balance)
            self._seq = event.seq
        self._outbox = []


class _Checkpoint(msgspec.Struct, frozen=True):
    assets: dict[str, Asset]
    contracts: dict[str, Contract]
    next_contract: int
    settlements: dict[tuple[str, int], dict[str, _Reading]]
    n_settlements: int
    sealed: dict[tuple[str, int], Balance]
    inflows: dict[tuple[str, int], list[Flow]]
    late: dict[tuple[str, int], list[LateEntry]]
    seq: int
    outbox: list[Record]


def _stored_balance(seal: BalanceSeal, rows: list[BalanceTransaction]) -> Balance:
    """A sealed balance as the ledger holds it; ValueError if its rows do not match the seal."""
    rows = sorted(rows, key=lambda r: r.seq)
    key = (seal.asset_id, seal.epoch)
    if [r.seq for r in rows] != list(range(seal.transactions)) or any(r.seal != seal.seal for r in rows):
        raise ValueError(f"the ledger's transactions of sealed balance {key} are incomplete")
    flows = tuple(Flow(r.from_id, r.to_id, r.energy) for r in rows)
    balance = Balance(seal.asset_id, seal.epoch, (seal.epoch_start, seal.epoch_end), flows, seal.seal)
    if sum(f.energy for f in flows) != seal.energy or not verify_seal(balance):
        raise ValueError(f"the seal of balance {key} does not match its transactions")
    return balance


def _check_contract(c: Contract) -> None:
    if c.partner == c.asset:
        raise MarketError("invalid", "a contract needs a partner other than its asset")
    if c.load_min > c.load_max:
        raise MarketError("invalid", f"load_min {c.load_min} is above load_max {c.load_max}")
    if c.energy < c.load_min:
        raise MarketError("invalid", f"energy {c.energy} is below load_min {c.load_min}: it could never be served")


def settlement_from_meter(record: MeterRecord, epoch_duration: int) -> AddSettlementMsg:
    """A market meter reading as a balancing settlement: the participant's exported
    generation (all sources) in the epoch that is its slot. The slot must be exactly one
    epoch (`epoch_duration` equal to the market's `duration`)."""
    start, end = record.time_interval_start, record.time_interval_end
    if end - start != epoch_duration or start % epoch_duration:
        raise MarketError("invalid", f"interval [{start}, {end}] is not one {epoch_duration} s epoch")
    generation = msgspec.json.decode(record.generation, type=dict[str, int])
    return AddSettlementMsg(
        meter_id=record.participant_id,
        epoch=start // epoch_duration,
        consumption=sum(generation.values()),
        label="market",
    )
