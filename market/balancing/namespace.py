"""The `/balancing` namespace (PROTOCOL.md, seed 002): a thin adapter over `market.balancing.balance`.

Event names follow the EAF API and contain dots (`asset.upsert`, `balancing.seal`, and the
`meritorder` service's `meritorder.list|add|remove|reorder`); `trigger_event` maps each to
its `on_<name with underscores>` handler, and answers any other event `invalid`. Only the
`operator` role may connect, and every event checks it again. Events are serialized by one
lock; each is applied to the core, its records (the journal entry, and a seal's rows) are
made durable, and only then is it answered; if they cannot be stored the core is rolled
back, so a failed event changes nothing. `start()` rebuilds the core from the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from market.balancing.balance import BALANCING_RECORDS, Balancing
from market.balancing.messages import (
    AddSettlementMsg,
    AssetUpsertMsg,
    BalanceRefMsg,
    ContractAddMsg,
    ContractCancelMsg,
    ContractUpdateMsg,
    MeritOrderAddMsg,
    MeritOrderRefMsg,
    MeritOrderRemoveMsg,
    MeritOrderReorderMsg,
)
from market.balancing.state import BalancingConfig
from market.core.protocol import decode
from market.core.records import Batch, Record
from market.core.registry import Role
from market.dispatch.base import Namespace, ServerPort, replying

log = logging.getLogger("microte.balancing")
T = TypeVar("T")

NAMESPACE = "/balancing"
ROLES: frozenset[Role] = frozenset({"operator"})

# wire event -> handler suffix (`on_<suffix>`)
EVENTS: dict[str, str] = {
    "asset.upsert": "asset_upsert",
    "contract.add": "contract_add",
    "contract.update": "contract_update",
    "contract.cancel": "contract_cancel",
    "meritorder.list": "meritorder_list",
    "meritorder.add": "meritorder_add",
    "meritorder.remove": "meritorder_remove",
    "meritorder.reorder": "meritorder_reorder",
    "balancing.addSettlement": "balancing_add_settlement",
    "balancing.seal": "balancing_seal",
    "balancing.get": "balancing_get",
}


class BalancingNamespace(Namespace):
    NAME = NAMESPACE
    ROLES = ROLES
    EVENTS = EVENTS

    def __init__(self, server: ServerPort, config: BalancingConfig | None = None) -> None:
        super().__init__(server)
        # By default an epoch is one market slot: epoch n is the slot starting at n * duration.
        self.core = Balancing(config or BalancingConfig(epoch_duration=server.config.duration))
        self._serial = asyncio.Lock()  # one event at a time: core call, then ledger write

    # -- lifetime and plumbing -----------------------------------------------------------

    async def start(self) -> None:
        """Rebuild assets, contracts, settlements and sealed balances from the ledger."""
        records: list[Record] = []
        for cls in BALANCING_RECORDS:
            records += [msgspec.convert(row, cls) for row in await self.ms.sink.read(cls.TABLE)]
        if not records:
            return
        self.core.restore(records)
        log.info("resumed /balancing from the ledger: %d records", len(records))

    async def _commit(self, change: Callable[[], T]) -> T:
        """Apply `change` to the core and make its records durable; undo it if either fails."""
        saved = self.core.checkpoint()
        try:
            result = change()
            records = self.core.take_records()
            if records:
                await self.ms.sink.write(Batch(tuple(records)))
        except BaseException:
            self.core.rollback(saved)
            raise
        return result

    # -- events ----------------------------------------------------------------------------

    @replying
    async def on_asset_upsert(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, AssetUpsertMsg)
        return await self._commit(lambda: self.core.upsert_asset(msg))

    @replying
    async def on_contract_add(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, ContractAddMsg)
        return await self._commit(lambda: self.core.add_contract(msg))

    @replying
    async def on_contract_update(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, ContractUpdateMsg)
        return await self._commit(lambda: self.core.update_contract(msg))

    @replying
    async def on_contract_cancel(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, ContractCancelMsg)
        return await self._commit(lambda: self.core.cancel_contract(msg))

    @replying
    async def on_balancing_add_settlement(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, AddSettlementMsg)
        return await self._commit(lambda: self.core.add_settlement(msg))

    @replying
    async def on_meritorder_list(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, MeritOrderRefMsg)
        return self.core.meritorder_list(msg)

    @replying
    async def on_meritorder_add(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, MeritOrderAddMsg)
        return await self._commit(lambda: self.core.meritorder_add(msg))

    @replying
    async def on_meritorder_remove(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, MeritOrderRemoveMsg)
        return await self._commit(lambda: self.core.meritorder_remove(msg))

    @replying
    async def on_meritorder_reorder(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, MeritOrderReorderMsg)
        return await self._commit(lambda: self.core.meritorder_reorder(msg))

    @replying
    async def on_balancing_seal(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "operator")
        msg = decode(data, BalanceRefMsg)
        # A sealed epoch answers `closed` before anything is stored: a re-seal writes nothing.
        # Unsealed inputs are sealed first, in the same write; a refusal stores none of them.
        sealed = await self._commit(lambda: self.core.seal_with_inputs(msg.asset_id, msg.epoch))
        for balance in sealed:
            log.info(
                "seal asset=%s epoch=%d transactions=%d meritorder=%s by=%s for=%s seal=%s",
                balance.asset,
                balance.epoch,
                len(balance.transactions),
                ",".join(balance.meritorder or ()),
                pid,
                msg.asset_id,
                balance.seal,
            )
        return {"balance": sealed[-1].wire(), "inputs": [b.wire() for b in sealed[:-1]]}

    @replying
    async def on_balancing_get(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, BalanceRefMsg)
        return {"balance": self.core.balance(msg.asset_id, msg.epoch).wire()}
