"""EAF balancing: the wire messages of `/balancing` and their value types."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from market.core.protocol import Message, Quantity, Wh

AssetId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ContractId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Epoch = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=10**6)]
Direction = Literal["to", "from"]
Status = Literal["active", "cancelled"]
Seal = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
MAX_MERIT_ORDER = 10_000  # PPAs in one `meritorder.reorder` (the default `max_contracts` in all)
Position = Annotated[int, msgspec.Meta(ge=0, le=MAX_MERIT_ORDER)]
MeritOrder = Annotated[list[ContractId], msgspec.Meta(max_length=MAX_MERIT_ORDER)]


# -- wire messages ---------------------------------------------------------------------------


class BalanceRuleMsg(Message, frozen=True):
    from_: AssetId | None = msgspec.field(default=None, name="from")
    to: AssetId | None = None


class AssetUpsertMsg(Message, frozen=True):
    """`asset.upsert`."""

    asset_id: AssetId = msgspec.field(name="assetId")
    type: Literal["balance"]
    balancerule: BalanceRuleMsg = BalanceRuleMsg()


class ContractAddMsg(Message, frozen=True):
    """`contract.add`: a PPA of `energy` Wh per epoch between the asset and its partner."""

    asset_id: AssetId = msgspec.field(name="assetId")
    partner_id: AssetId = msgspec.field(name="partnerId")
    direction: Direction
    status: Status
    energy: Quantity
    load_min: Wh
    load_max: Wh
    balanced: Wh = 0  # EAF bookkeeping field: accepted and echoed, not used
    priority: Priority = 0


class ContractUpdateMsg(Message, frozen=True):
    """`contract.update` (extension, docs/balancing.md): fields given replace the contract's."""

    id: ContractId
    partner_id: AssetId | None = msgspec.field(default=None, name="partnerId")
    energy: Quantity | None = None
    load_min: Wh | None = None
    load_max: Wh | None = None
    balanced: Wh | None = None
    priority: Priority | None = None


class ContractCancelMsg(Message, frozen=True):
    """`contract.cancel` (extension, docs/balancing.md)."""

    id: ContractId


class AddSettlementMsg(Message, frozen=True):
    """`balancing.addSettlement`: energy metered at `meterId` (an asset id) in `epoch`."""

    meter_id: AssetId = msgspec.field(name="meterId")
    epoch: Epoch
    consumption: Wh
    label: Label | None = None


class BalanceRefMsg(Message, frozen=True):
    """`balancing.seal` and `balancing.get`."""

    asset_id: AssetId = msgspec.field(name="assetId")
    epoch: Epoch


class MeritOrderRefMsg(Message, frozen=True):
    """`meritorder.list`: the merit order of one asset (balancing point)."""

    asset_id: AssetId = msgspec.field(name="assetId")


class MeritOrderAddMsg(Message, frozen=True):
    """`meritorder.add`: put an active PPA of the asset on its merit order, at `position`
    (0-based; default: where its priority places it)."""

    asset_id: AssetId = msgspec.field(name="assetId")
    id: ContractId
    position: Position | None = None


class MeritOrderRemoveMsg(Message, frozen=True):
    """`meritorder.remove`: take a PPA off the asset's merit order (it stays active, unapplied)."""

    asset_id: AssetId = msgspec.field(name="assetId")
    id: ContractId


class MeritOrderReorderMsg(Message, frozen=True):
    """`meritorder.reorder`: the asset's merit order anew: exactly the PPAs on it, in a new order."""

    asset_id: AssetId = msgspec.field(name="assetId")
    order: MeritOrder


# -- journal payloads (ledger table balance_events) ----------------------------------------------


class SealRecordMsg(Message, frozen=True, omit_defaults=True):
    """The journal entry of a seal: the merit order it applied, its seal, and, for an input
    sealed first by another asset's `balancing.seal`, that asset. Journals written before
    these fields existed hold only `assetId` and `epoch`."""

    asset_id: AssetId = msgspec.field(name="assetId")
    epoch: Epoch
    meritorder: MeritOrder | None = None
    seal: Seal | None = None
    input_of: AssetId | None = msgspec.field(default=None, name="inputOf")
