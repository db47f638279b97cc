"""Energy Web flexibility (seed 001): contracts, requests, allocation strategies and the state
machine (pure), and its `/flex` namespace adapter (`market.flexibility.namespace`)."""

from market.flexibility.contracts import (
    Allotment as Allotment,
)
from market.flexibility.contracts import (
    Contract as Contract,
)
from market.flexibility.contracts import (
    Delivery as Delivery,
)
from market.flexibility.contracts import (
    DeliveryCheck as DeliveryCheck,
)
from market.flexibility.contracts import (
    Opened as Opened,
)
from market.flexibility.contracts import (
    Request as Request,
)
from market.flexibility.contracts import (
    check_delivery as check_delivery,
)
from market.flexibility.contracts import (
    energy_wh as energy_wh,
)
from market.flexibility.machine import (
    Flexibility as Flexibility,
)
from market.flexibility.messages import (
    MAX_POWER as MAX_POWER,
)
from market.flexibility.messages import (
    RESULTS_PAGE as RESULTS_PAGE,
)
from market.flexibility.messages import (
    RESULTS_PAGE_MAX as RESULTS_PAGE_MAX,
)
from market.flexibility.messages import (
    RESULTS_PAGE_PROSUMERS as RESULTS_PAGE_PROSUMERS,
)
from market.flexibility.messages import (
    YEAR as YEAR,
)
from market.flexibility.messages import (
    Answer as Answer,
)
from market.flexibility.messages import (
    AnswerMsg as AnswerMsg,
)
from market.flexibility.messages import (
    ContractRefMsg as ContractRefMsg,
)
from market.flexibility.messages import (
    ContractRegisterMsg as ContractRegisterMsg,
)
from market.flexibility.messages import (
    ContractRenegotiateMsg as ContractRenegotiateMsg,
)
from market.flexibility.messages import (
    ContractStatus as ContractStatus,
)
from market.flexibility.messages import (
    Direction as Direction,
)
from market.flexibility.messages import (
    Duration as Duration,
)
from market.flexibility.messages import (
    FlexConfig as FlexConfig,
)
from market.flexibility.messages import (
    FlexMeterMsg as FlexMeterMsg,
)
from market.flexibility.messages import (
    FlexPrice as FlexPrice,
)
from market.flexibility.messages import (
    Notice as Notice,
)
from market.flexibility.messages import (
    PartyId as PartyId,
)
from market.flexibility.messages import (
    PowerW as PowerW,
)
from market.flexibility.messages import (
    RefId as RefId,
)
from market.flexibility.messages import (
    ReputationRules as ReputationRules,
)
from market.flexibility.messages import (
    RequestMsg as RequestMsg,
)
from market.flexibility.messages import (
    RequestRefMsg as RequestRefMsg,
)
from market.flexibility.messages import (
    RequestStatus as RequestStatus,
)
from market.flexibility.messages import (
    ResultsMsg as ResultsMsg,
)
from market.flexibility.messages import (
    Seconds as Seconds,
)
from market.flexibility.messages import (
    SignedPowerW as SignedPowerW,
)
from market.flexibility.messages import (
    StrategyMsg as StrategyMsg,
)
from market.flexibility.messages import (
    StrategyName as StrategyName,
)
from market.flexibility.strategies import (
    Allocation as Allocation,
)
from market.flexibility.strategies import (
    Candidate as Candidate,
)
from market.flexibility.strategies import (
    FairStrategy as FairStrategy,
)
from market.flexibility.strategies import (
    ReputationStrategy as ReputationStrategy,
)
from market.flexibility.strategies import (
    Share as Share,
)
from market.flexibility.strategies import (
    Strategy as Strategy,
)
from market.flexibility.strategies import (
    default_strategies as default_strategies,
)
