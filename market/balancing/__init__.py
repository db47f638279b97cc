"""STROMDAO EAF balancing (seed 002): balance rules, PPAs in merit order and seals (pure), and its
`/balancing` namespace adapter (`market.balancing.namespace`)."""

from market.balancing.balance import (
    Balancing as Balancing,
)
from market.balancing.balance import (
    settlement_from_meter as settlement_from_meter,
)
from market.balancing.messages import (
    AddSettlementMsg as AddSettlementMsg,
)
from market.balancing.messages import (
    AssetId as AssetId,
)
from market.balancing.messages import (
    AssetUpsertMsg as AssetUpsertMsg,
)
from market.balancing.messages import (
    BalanceRefMsg as BalanceRefMsg,
)
from market.balancing.messages import (
    BalanceRuleMsg as BalanceRuleMsg,
)
from market.balancing.messages import (
    ContractAddMsg as ContractAddMsg,
)
from market.balancing.messages import (
    ContractCancelMsg as ContractCancelMsg,
)
from market.balancing.messages import (
    ContractId as ContractId,
)
from market.balancing.messages import (
    ContractUpdateMsg as ContractUpdateMsg,
)
from market.balancing.messages import (
    Direction as Direction,
)
from market.balancing.messages import (
    Epoch as Epoch,
)
from market.balancing.messages import (
    Label as Label,
)
from market.balancing.messages import (
    MeritOrderAddMsg as MeritOrderAddMsg,
)
from market.balancing.messages import (
    MeritOrderRefMsg as MeritOrderRefMsg,
)
from market.balancing.messages import (
    MeritOrderRemoveMsg as MeritOrderRemoveMsg,
)
from market.balancing.messages import (
    MeritOrderReorderMsg as MeritOrderReorderMsg,
)
from market.balancing.messages import (
    Priority as Priority,
)
from market.balancing.messages import (
    SealRecordMsg as SealRecordMsg,
)
from market.balancing.messages import (
    Status as Status,
)
from market.balancing.seals import (
    canonical_json as canonical_json,
)
from market.balancing.seals import (
    seal_of as seal_of,
)
from market.balancing.seals import (
    verify_seal as verify_seal,
)
from market.balancing.state import (
    Asset as Asset,
)
from market.balancing.state import (
    Balance as Balance,
)
from market.balancing.state import (
    BalancingConfig as BalancingConfig,
)
from market.balancing.state import (
    Contract as Contract,
)
from market.balancing.state import (
    Flow as Flow,
)
from market.balancing.state import (
    LateEntry as LateEntry,
)
