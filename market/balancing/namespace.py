"""The `/balancing` namespace (PROTOCOL.md, seed 002): a thin adapter over `market.balancing.balance`.

Event names follow the EAF API and contain dots (`asset.upsert`, `balancing.seal`);
`trigger_event` maps each to its `on_<name with underscores>` handler, and answers any
other event `invalid`. Only the `operator` role may connect. Events are serialized by one
lock, so a seal is derived, written to the ledger and committed with nothing in between;
its reply is sent only once its records are durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from market.balancing.balance import Balancing
from market.balancing.messages import (
    AddSettlementMsg,
    AssetUpsertMsg,
    BalanceRefMsg,
    ContractAddMsg,
    ContractCancelMsg,
    ContractUpdateMsg,
)
from market.balancing.state import BalancingConfig
from market.core.protocol import decode
from market.core.records import Batch
from market.core.registry import Role
from market.dispatch.base import Namespace, ServerPort, replying

log = logging.getLogger("microte.balancing")

NAMESPACE = "/balancing"
ROLES: frozenset[Role] = frozenset({"operator"})

# wire event -> handler suffix (`on_<suffix>`)
EVENTS: dict[str, str] = {
    "asset.upsert": "asset_upsert",
    "contract.add": "contract_add",
    "contract.update": "contract_update",
    "contract.cancel": "contract_cancel",
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

    @replying
    async def on_asset_upsert(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        return self.core.upsert_asset(decode(data, AssetUpsertMsg))

    @replying
    async def on_contract_add(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        return self.core.add_contract(decode(data, ContractAddMsg))

    @replying
    async def on_contract_update(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        return self.core.update_contract(decode(data, ContractUpdateMsg))

    @replying
    async def on_contract_cancel(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        return self.core.cancel_contract(decode(data, ContractCancelMsg))

    @replying
    async def on_balancing_add_settlement(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        return self.core.add_settlement(decode(data, AddSettlementMsg))

    @replying
    async def on_balancing_seal(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "operator")
        msg = decode(data, BalanceRefMsg)
        balance = self.core.propose_seal(msg.asset_id, msg.epoch)
        await self.ms.sink.write(Batch(self.core.records(balance)))
        self.core.commit_seal(balance)
        log.info(
            "seal asset=%s epoch=%d transactions=%d by=%s seal=%s",
            balance.asset,
            balance.epoch,
            len(balance.transactions),
            pid,
            balance.seal,
        )
        return {"balance": balance.wire()}

    @replying
    async def on_balancing_get(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "operator")
        msg = decode(data, BalanceRefMsg)
        return {"balance": self.core.balance(msg.asset_id, msg.epoch).wire()}
