"""EAF balancing (seed 002, PROTOCOL.md namespace `/balancing`) as a pure core.

Assets carry a balance rule (`from`: who balances them, `to`: where their energy goes),
PPAs (contracts) bind an asset to a partner, each asset has a merit order (the list of its
PPAs that sealing applies, in order), and meter settlements report energy per (meter,
epoch). Sealing an asset's epoch derives its transactions:

1. metered values first: the asset's *position* is the energy metered at it plus what the
   sealed balances of other assets delivered to it in that epoch, minus what they drew
   from it (as their balancer, or as the partner of their `from` PPAs);
2. then the PPAs on its merit order, in that order: each is served `min(energy, load_max,
   energy still unserved of the position)`, or not at all when that is below `load_min`; a
   `to` PPA delivers asset -> partner and the asset draws the same energy from
   `balancerule.from` (without a `from` rule the delivery comes out of the position); a
   `from` PPA delivers partner -> asset and the asset passes it on along `to`;
3. what is left of the position goes on along `to` (a surplus) or is drawn from `from` (a
   shortfall): the transaction listed first. An asset with a rule is a *balancing point*
   and must end the epoch at zero: one that cannot (a surplus and no `to`, a shortfall and
   no `from`) is refused. An asset with no rule is an endpoint and keeps its position.

A balance derives its inputs: sealing an asset first seals, in dependency order, every
unsealed asset whose balance in that epoch holds a transaction of it (its sources along
`to`, the assets it balances, the assets whose PPAs name it), all in one step; inputs that
depend on each other in a cycle are refused. A sealed epoch is final: settlements (and
transfers from assets that became inputs after it) that arrive after it are kept apart as
`late` and never change it. The `seal` is the sha256 hex of a canonical JSON of (assetId,
epoch, transactions), so anyone holding the transactions can check it (`verify_seal`).
Nothing here touches a socket, clock or database: methods return replies, balances and
ledger records; the namespace handler stores and emits them.

Every accepted change is also one journal record (`BalanceEventRecord`, in the order
accepted) left in an outbox (`take_records`); a seal's record names the merit order it
applied. `restore(records)` rebuilds the whole state from the journal and the seal rows,
so a restarted server continues where the ledger ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from market.balancing.messages import (
    AddSettlementMsg,
    AssetUpsertMsg,
    ContractAddMsg,
    ContractCancelMsg,
    ContractUpdateMsg,
    MeritOrderAddMsg,
    MeritOrderRefMsg,
    MeritOrderRemoveMsg,
    MeritOrderReorderMsg,
    SealRecordMsg,
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
    "meritorder.add": MeritOrderAddMsg,
    "meritorder.remove": MeritOrderRemoveMsg,
    "meritorder.reorder": MeritOrderReorderMsg,
    "balancing.addSettlement": AddSettlementMsg,
    "balancing.seal": SealRecordMsg,
}

# What a seal undoes if a later step of the same request is refused: (dict, key) of each
# list it appended to, in order.
_Undo = list[tuple[dict[tuple[str, int], list[Any]], tuple[str, int]]]

# -- the core --------------------------------------------------------------------------------


class Balancing:
    """Assets, contracts, merit orders, settlements and sealed balances of one market operator."""

    def __init__(self, config: BalancingConfig | None = None) -> None:
        self.config = config or BalancingConfig()
        self._assets: dict[str, Asset] = {}
        self._contracts: dict[str, Contract] = {}
        self._next_contract = 1
        self._order: dict[str, list[str]] = {}  # asset -> its merit order (active contract ids)
        # (meter, epoch) -> label ("" if none) -> reading, in arrival order
        self._settlements: dict[tuple[str, int], dict[str, _Reading]] = {}
        self._n_settlements = 0
        self._sealed: dict[tuple[str, int], Balance] = {}
        # transactions of sealed balances into / out of another asset, on time (before its seal)
        self._inflows: dict[tuple[str, int], list[Flow]] = {}
        self._outflows: dict[tuple[str, int], list[Flow]] = {}
        self._late: dict[tuple[str, int], list[LateEntry]] = {}
        self._seq = 0  # journal: the last event's number
        self._outbox: list[Record] = []  # ledger records not yet taken by the caller
        self._graph: dict[str, list[str]] | None = None  # `_inputs()`, until rules or PPAs change

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
        if contract.status == "active":
            self._list(contract, self._place(contract))
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
            if new.priority != old.priority and new.id in self._order.get(new.asset, ()):
                self._unlist(new)  # a new priority places it anew on the merit order
                self._list(new, self._place(new))
            self._journal("contract.update", msg)
        return {"contract": new.wire()}

    def cancel_contract(self, msg: ContractCancelMsg) -> dict[str, Any]:
        old = self._contract(msg.id)
        if old.status == "cancelled":
            raise MarketError("closed", f"contract {msg.id!r} is already cancelled")
        new = self._contracts[old.id] = msgspec.structs.replace(old, status="cancelled")
        if new.id in self._order.get(new.asset, ()):
            self._unlist(new)
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

    # -- merit order ---------------------------------------------------------------------

    def merit_order(self, asset_id: str) -> list[Contract]:
        """The PPAs sealing the asset applies, in the order it applies them."""
        return [self._contracts[c] for c in self._order.get(asset_id, ())]

    def meritorder_list(self, msg: MeritOrderRefMsg) -> dict[str, Any]:
        self.asset(msg.asset_id)
        return self._meritorder_reply(msg.asset_id)

    def meritorder_add(self, msg: MeritOrderAddMsg) -> dict[str, Any]:
        contract = self._ppa_of(msg.asset_id, msg.id)
        order = self._order.get(msg.asset_id, [])
        if contract.id in order:
            where = order.index(contract.id)
            raise MarketError(
                "conflict", f"contract {contract.id!r} is already on the merit order of {msg.asset_id!r} at {where}"
            )
        if contract.status == "cancelled":
            raise MarketError("closed", f"contract {contract.id!r} is cancelled: only active PPAs are applied")
        if msg.position is not None and msg.position > len(order):
            raise MarketError(
                "invalid",
                f"position {msg.position} is past the end of the merit order of {msg.asset_id!r}"
                f" ({len(order)} PPAs: 0 to {len(order)})",
            )
        self._list(contract, self._place(contract) if msg.position is None else msg.position)
        self._journal("meritorder.add", msg)
        return self._meritorder_reply(msg.asset_id)

    def meritorder_remove(self, msg: MeritOrderRemoveMsg) -> dict[str, Any]:
        contract = self._ppa_of(msg.asset_id, msg.id)
        if contract.id not in self._order.get(msg.asset_id, ()):
            raise MarketError("not_found", f"contract {contract.id!r} is not on the merit order of {msg.asset_id!r}")
        self._unlist(contract)
        self._journal("meritorder.remove", msg)
        return self._meritorder_reply(msg.asset_id)

    def meritorder_reorder(self, msg: MeritOrderReorderMsg) -> dict[str, Any]:
        self.asset(msg.asset_id)
        order = self._order.get(msg.asset_id, [])
        seen: set[str] = set()
        for cid in msg.order:
            if cid in seen:
                raise MarketError("invalid", f"contract {cid!r} is listed twice")
            seen.add(cid)
        listed = set(order)
        extra = [c for c in msg.order if c not in listed]
        if extra:
            raise MarketError(
                "invalid",
                f"not on the merit order of {msg.asset_id!r}: {', '.join(extra)}"
                " (a reorder lists exactly the PPAs on it; meritorder.add puts one on)",
            )
        missing = [c for c in order if c not in seen]
        if missing:
            raise MarketError(
                "invalid",
                f"the new order of {msg.asset_id!r} leaves out {', '.join(missing)}"
                " (a reorder lists exactly the PPAs on it; meritorder.remove takes one off)",
            )
        if msg.order != order:
            self._order[msg.asset_id] = list(msg.order)
            self._journal("meritorder.reorder", msg)
        return self._meritorder_reply(msg.asset_id)

    def _ppa_of(self, asset_id: str, contract_id: str) -> Contract:
        self.asset(asset_id)
        contract = self._contract(contract_id)
        if contract.asset != asset_id:
            raise MarketError(
                "invalid", f"contract {contract_id!r} is a PPA of {contract.asset!r}, not of {asset_id!r}"
            )
        return contract

    def _meritorder_reply(self, asset_id: str) -> dict[str, Any]:
        order = self._order.get(asset_id, [])
        listed = set(order)
        unlisted = [c.id for c in self.contracts(asset_id) if c.status == "active" and c.id not in listed]
        return {"meritorder": {"assetId": asset_id, "order": list(order), "unlisted": unlisted}}

    def _place(self, contract: Contract) -> int:
        """Where the contract's priority puts it: before the first listed one of a higher
        priority (so, as long as nobody reorders, the order is priority, then age)."""
        order = self._order.get(contract.asset, [])
        for i, cid in enumerate(order):
            if self._contracts[cid].priority > contract.priority:
                return i
        return len(order)

    def _list(self, contract: Contract, position: int) -> None:
        self._order.setdefault(contract.asset, []).insert(position, contract.id)

    def _unlist(self, contract: Contract) -> None:
        order = self._order[contract.asset]
        order.remove(contract.id)
        if not order:
            del self._order[contract.asset]

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
            entry = LateEntry("settlement", msg.meter_id, msg.meter_id, msg.consumption, msg.label)
            self._late.setdefault(key, []).append(entry)
        self._journal("balancing.addSettlement", msg)
        return {"late": late}

    def metered(self, asset_id: str, epoch: int) -> int:
        """Energy metered at the asset in the epoch, late settlements excluded."""
        return sum(r.consumption for r in self._settlements.get((asset_id, epoch), {}).values() if not r.late)

    def received(self, asset_id: str, epoch: int) -> int:
        """Metered energy plus what sealed balances of other assets delivered to it (on time)."""
        return self.metered(asset_id, epoch) + sum(f.energy for f in self._inflows.get((asset_id, epoch), ()))

    def drawn(self, asset_id: str, epoch: int) -> int:
        """What sealed balances of other assets drew from it (on time): as their balancer,
        or as the partner of their `from` PPAs."""
        return sum(f.energy for f in self._outflows.get((asset_id, epoch), ()))

    # -- balances ------------------------------------------------------------------------

    def derive(self, asset_id: str, epoch: int) -> tuple[tuple[Flow, ...], int]:
        """The transactions sealing the asset's epoch alone would give now, with what the
        asset would be left holding (> 0) or short of (< 0) after them: its imbalance, 0
        for an endpoint (see the module doc)."""
        asset = self.asset(asset_id)
        position = self.received(asset_id, epoch) - self.drawn(asset_id, epoch)
        unserved = max(position, 0)
        contract_flows: list[Flow] = []
        for c in self.merit_order(asset_id):
            served = min(c.energy, c.load_max, unserved)
            if served <= 0 or served < c.load_min:
                continue
            unserved -= served
            if c.direction == "to":
                contract_flows.append(Flow(asset_id, c.partner, served))
                position -= served
                if asset.from_ is not None:
                    contract_flows.append(Flow(asset.from_, asset_id, served))
                    position += served
            else:
                contract_flows.append(Flow(c.partner, asset_id, served))
                position += served
                if asset.to is not None:
                    contract_flows.append(Flow(asset_id, asset.to, served))
                    position -= served
        residual: list[Flow] = []
        if position > 0 and asset.to is not None:
            residual, position = [Flow(asset_id, asset.to, position)], 0
        elif position < 0 and asset.from_ is not None:
            residual, position = [Flow(asset.from_, asset_id, -position)], 0
        endpoint = asset.from_ is None and asset.to is None
        return (*residual, *contract_flows), 0 if endpoint else position

    def balance(self, asset_id: str, epoch: int) -> Balance:
        """The sealed balance (with what arrived late), or a preview of sealing it now: as
        if its unsealed inputs were sealed first, as a seal does; nothing is kept."""
        key = (asset_id, epoch)
        sealed = self._sealed.get(key)
        if sealed is not None:
            return msgspec.structs.replace(sealed, late=tuple(self._late.get(key, ())))
        self.asset(asset_id)
        try:
            plan = self._seal_plan(asset_id, epoch)
        except MarketError:  # a cycle: a seal is refused; preview with what is sealed
            plan = [asset_id]
        applied: list[tuple[Balance, _Undo]] = []
        try:
            for name in plan[:-1]:
                balance = Balance(name, epoch, self.epoch_interval(epoch), self.derive(name, epoch)[0])
                applied.append((balance, self._apply_seal(balance)))
            flows, imbalance = self.derive(asset_id, epoch)
        finally:
            for balance, undo in reversed(applied):
                self._unapply_seal(balance, undo)
        order = tuple(self._order.get(asset_id, ()))
        return Balance(asset_id, epoch, self.epoch_interval(epoch), flows, meritorder=order, imbalance=imbalance)

    def is_sealed(self, asset_id: str, epoch: int) -> bool:
        return (asset_id, epoch) in self._sealed

    def seal(self, asset_id: str, epoch: int) -> Balance:
        """Seal the asset's epoch (its unsealed inputs first); its sealed balance."""
        return self.seal_with_inputs(asset_id, epoch)[-1]

    def seal_with_inputs(self, asset_id: str, epoch: int) -> tuple[Balance, ...]:
        """Seal the asset's epoch, after every unsealed input in dependency order, all or
        nothing: the balances sealed, the asset's last. Refused (`closed`) if it is sealed,
        (`invalid`) if its inputs depend on each other in a cycle or one of them, or it,
        would not be balanced; a refusal changes nothing. Each seal's journal entry (with
        the merit order it applied) and ledger rows go to the outbox."""
        if (asset_id, epoch) in self._sealed:
            raise MarketError("closed", f"epoch {epoch} of {asset_id!r} is already sealed (balancing.get reads it)")
        self.asset(asset_id)
        plan = self._seal_plan(asset_id, epoch)
        seq, outbox = self._seq, len(self._outbox)
        done: list[tuple[Balance, _Undo]] = []
        try:
            for name in plan:
                flows, imbalance = self.derive(name, epoch)
                if imbalance:
                    raise MarketError("invalid", self._unbalanced(name, epoch, flows, imbalance, asset_id))
                order = tuple(self._order.get(name, ()))
                seal = seal_of(name, epoch, (f.wire() for f in flows))
                balance = Balance(name, epoch, self.epoch_interval(epoch), flows, seal, meritorder=order)
                done.append((balance, self._apply_seal(balance)))
                record = SealRecordMsg(
                    asset_id=name,
                    epoch=epoch,
                    meritorder=list(order),
                    seal=seal,
                    input_of=None if name == asset_id else asset_id,
                )
                self._journal("balancing.seal", record)
                self._outbox.extend(self.records(balance))
        except BaseException:
            for balance, undo in reversed(done):
                self._unapply_seal(balance, undo)
            self._seq = seq
            del self._outbox[outbox:]
            raise
        return tuple(b for b, _ in done)

    def _inputs(self) -> dict[str, list[str]]:
        """asset -> the assets whose balances hold transactions of it: those with a rule
        `from` or `to` it, and those with a PPA on their merit order naming it. Kept until
        an event changes a rule, a PPA or a merit order (every such event is journalled)."""
        if self._graph is None:
            inputs: dict[str, list[str]] = {}
            for a in self._assets.values():
                named = {a.from_, a.to, *(self._contracts[c].partner for c in self._order.get(a.id, ()))}
                for target in sorted(n for n in named if n is not None and n != a.id and n in self._assets):
                    inputs.setdefault(target, []).append(a.id)
            self._graph = inputs
        return self._graph

    def _seal_plan(self, asset_id: str, epoch: int) -> list[str]:
        """The asset's unsealed inputs for the epoch, each after its own, then the asset;
        `invalid` naming the cycle if they depend on each other."""
        inputs = self._inputs()
        plan: list[str] = []
        done: set[str] = set()
        path = [asset_id]  # the assets being planned, each an input of the one before
        on_path = {asset_id}
        stack = [iter(inputs.get(asset_id, ()))]
        while stack:
            for nxt in stack[-1]:
                if nxt in done or (nxt, epoch) in self._sealed:
                    continue
                if nxt in on_path:
                    cycle = [*path[path.index(nxt) :], nxt]
                    raise MarketError(
                        "invalid",
                        f"cannot seal {asset_id!r} in epoch {epoch}: the balances of"
                        f" {', '.join(sorted(set(cycle)))} take their inputs from each other"
                        f" ({' -> '.join(reversed(cycle))}), so none can be sealed before the others;"
                        " change a rule or a PPA (PPAs both ways belong on one asset, as `to` and `from`)",
                    )
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(inputs.get(nxt, ())))
                break
            else:
                stack.pop()
                name = path.pop()
                on_path.discard(name)
                done.add(name)
                plan.append(name)
        return plan

    def _unbalanced(self, name: str, epoch: int, flows: tuple[Flow, ...], imbalance: int, requested: str) -> str:
        came = self.received(name, epoch) + sum(f.energy for f in flows if f.to == name)
        went = self.drawn(name, epoch) + sum(f.energy for f in flows if f.from_ == name)
        what = f"{name!r} is not balanced in epoch {epoch}: {came} Wh in, {went} Wh out, "
        if imbalance > 0:
            what += (
                f"{imbalance} Wh left over and its balancerule has no `to` to pass it on to;"
                " upsert it with a `to` (or with no rule: an endpoint keeps what it receives), then seal"
            )
        else:
            what += (
                f"short of {-imbalance} Wh and its balancerule has no `from` to draw it from;"
                " upsert it with a `from`, then seal"
            )
        return what if name == requested else f"cannot seal {requested!r}: its input {what}"

    def _apply_seal(self, balance: Balance) -> _Undo:
        """Make the balance sealed: each of its transactions counts for the other asset's
        epoch, or is late there if that is sealed already. Returns what to undo it with."""
        key = (balance.asset, balance.epoch)
        self._sealed[key] = balance
        undo: _Undo = []
        for flow in balance.transactions:
            for who, book in ((flow.to, self._inflows), (flow.from_, self._outflows)):
                if who == balance.asset:
                    continue
                target = (who, balance.epoch)
                if target in self._sealed:
                    self._late.setdefault(target, []).append(LateEntry("transfer", flow.from_, flow.to, flow.energy))
                    undo.append((self._late, target))
                else:
                    book.setdefault(target, []).append(flow)
                    undo.append((book, target))
        return undo

    def _unapply_seal(self, balance: Balance, undo: _Undo) -> None:
        for book, target in reversed(undo):
            entries = book[target]
            entries.pop()
            if not entries:
                del book[target]
        del self._sealed[(balance.asset, balance.epoch)]

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
                "order": [[k, v] for k, v in self._order.items()],
                "settlements": [[*k, list(v.items())] for k, v in self._settlements.items()],
                "n_settlements": self._n_settlements,
                "sealed": list(self._sealed.values()),
                "inflows": [[*k, v] for k, v in self._inflows.items()],
                "outflows": [[*k, v] for k, v in self._outflows.items()],
                "late": [[*k, v] for k, v in self._late.items()],
                "seq": self._seq,
            }
        )
        return state

    # -- journal, undo and restore -------------------------------------------------------

    def _journal(self, event: str, msg: msgspec.Struct) -> None:
        if event not in ("balancing.addSettlement", "balancing.seal"):
            self._graph = None  # a rule, a PPA or a merit order changed
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
            order={k: list(v) for k, v in self._order.items()},
            settlements={k: dict(v) for k, v in self._settlements.items()},
            n_settlements=self._n_settlements,
            sealed=dict(self._sealed),
            inflows={k: list(v) for k, v in self._inflows.items()},
            outflows={k: list(v) for k, v in self._outflows.items()},
            late={k: list(v) for k, v in self._late.items()},
            seq=self._seq,
            outbox=list(self._outbox),
        )

    def rollback(self, saved: _Checkpoint) -> None:
        self._assets = dict(saved.assets)
        self._contracts = dict(saved.contracts)
        self._next_contract = saved.next_contract
        self._order = {k: list(v) for k, v in saved.order.items()}
        self._settlements = {k: dict(v) for k, v in saved.settlements.items()}
        self._n_settlements = saved.n_settlements
        self._sealed = dict(saved.sealed)
        self._inflows = {k: list(v) for k, v in saved.inflows.items()}
        self._outflows = {k: list(v) for k, v in saved.outflows.items()}
        self._late = {k: list(v) for k, v in saved.late.items()}
        self._seq = saved.seq
        self._outbox = list(saved.outbox)
        self._graph = None

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
        elif isinstance(msg, MeritOrderAddMsg):
            self.meritorder_add(msg)
        elif isinstance(msg, MeritOrderRemoveMsg):
            self.meritorder_remove(msg)
        elif isinstance(msg, MeritOrderReorderMsg):
            self.meritorder_reorder(msg)
        elif isinstance(msg, SealRecordMsg):
            key = (msg.asset_id, msg.epoch)
            balance = stored.get(key)
            if balance is None:
                raise ValueError(f"journal event {event.id} seals {key}, but the ledger has no such seal")
            if key in self._sealed:
                raise ValueError(f"journal event {event.id} seals {key} a second time")
            if msg.seal is not None and msg.seal != balance.seal:
                raise ValueError(f"journal event {event.id} seals {key} as {msg.seal}, the ledger as {balance.seal}")
            self.asset(msg.asset_id)
            order = None if msg.meritorder is None else tuple(msg.meritorder)
            self._apply_seal(msgspec.structs.replace(balance, meritorder=order))
            self._seq = event.seq
        self._outbox = []


class _Checkpoint(msgspec.Struct, frozen=True):
    assets: dict[str, Asset]
    contracts: dict[str, Contract]
    next_contract: int
    order: dict[str, list[str]]
    settlements: dict[tuple[str, int], dict[str, _Reading]]
    n_settlements: int
    sealed: dict[tuple[str, int], Balance]
    inflows: dict[tuple[str, int], list[Flow]]
    outflows: dict[tuple[str, int], list[Flow]]
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
