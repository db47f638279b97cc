"""The Parity market (seed 000): LEMs, community pricing, tokens, SLAs and KPIs (pure), the
pseudonyms of its participants (`market.community.pseudonyms`), and its `/grid` namespace
adapter (`market.community.namespace`)."""

from market.community.messages import (
    KPI_PLAYER_ROLES as KPI_PLAYER_ROLES,
)
from market.community.messages import (
    LEM_PLAYER_ROLES as LEM_PLAYER_ROLES,
)
from market.community.messages import (
    SEED_DEFAULTS as SEED_DEFAULTS,
)
from market.community.messages import (
    SEVERITY as SEVERITY,
)
from market.community.messages import (
    Beta as Beta,
)
from market.community.messages import (
    Cents as Cents,
)
from market.community.messages import (
    Finite as Finite,
)
from market.community.messages import (
    GridStateSetMsg as GridStateSetMsg,
)
from market.community.messages import (
    KpiMeasureMsg as KpiMeasureMsg,
)
from market.community.messages import (
    KpiMsg as KpiMsg,
)
from market.community.messages import (
    LemDefaultsSetMsg as LemDefaultsSetMsg,
)
from market.community.messages import (
    LemMeasureMsg as LemMeasureMsg,
)
from market.community.messages import (
    LemParams as LemParams,
)
from market.community.messages import (
    LemSetMsg as LemSetMsg,
)
from market.community.messages import (
    LemSolveMsg as LemSolveMsg,
)
from market.community.messages import (
    Measured as Measured,
)
from market.community.messages import (
    Micro as Micro,
)
from market.community.messages import (
    Name as Name,
)
from market.community.messages import (
    ParityConfig as ParityConfig,
)
from market.community.messages import (
    Players as Players,
)
from market.community.messages import (
    PseudonymConfig as PseudonymConfig,
)
from market.community.messages import (
    Resolution as Resolution,
)
from market.community.messages import (
    RoleOf as RoleOf,
)
from market.community.messages import (
    Rule as Rule,
)
from market.community.messages import (
    Signal as Signal,
)
from market.community.messages import (
    SlaSetMsg as SlaSetMsg,
)
from market.community.messages import (
    SlaSolveMsg as SlaSolveMsg,
)
from market.community.parity import (
    PARITY_RECORDS as PARITY_RECORDS,
)
from market.community.parity import (
    Parity as Parity,
)
from market.community.parity import (
    penalty_wire as penalty_wire,
)
from market.community.parity import (
    transfer_wire as transfer_wire,
)
from market.community.solver import (
    LemSolution as LemSolution,
)
from market.community.solver import (
    auction_money as auction_money,
)
from market.community.solver import (
    community_flow as community_flow,
)
from market.community.solver import (
    lem_amount as lem_amount,
)
from market.community.solver import (
    lem_prices as lem_prices,
)
from market.community.solver import (
    measurements_from_meters as measurements_from_meters,
)
from market.community.solver import (
    solve_lem as solve_lem,
)
from market.community.state import (
    Change as Change,
)
from market.community.state import (
    Kpi as Kpi,
)
from market.community.state import (
    Lem as Lem,
)
from market.community.state import (
    Measurement as Measurement,
)
from market.community.state import (
    Sla as Sla,
)
