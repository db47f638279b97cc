"""Grid physics (seed 004, PEMT-CoSim): pandapower feeders, power flows and grid states
(`market.feeder.network`), with the capacity limits the auction clears within
(`market.core.capacity`), re-exported here."""

from market.core.capacity import (
    Branch as Branch,
)
from market.core.capacity import (
    CapacityLimits as CapacityLimits,
)
from market.core.capacity import (
    Sensitivities as Sensitivities,
)
from market.core.capacity import (
    limit_fills as limit_fills,
)
from market.feeder.network import (
    NETWORKS as NETWORKS,
)
from market.feeder.network import (
    PREFIX as PREFIX,
)
from market.feeder.network import (
    SEVERITY as SEVERITY,
)
from market.feeder.network import (
    Band as Band,
)
from market.feeder.network import (
    Feeder as Feeder,
)
from market.feeder.network import (
    FeederConfig as FeederConfig,
)
from market.feeder.network import (
    FlowResult as FlowResult,
)
from market.feeder.network import (
    Thresholds as Thresholds,
)
from market.feeder.network import (
    average_w as average_w,
)
from market.feeder.network import (
    classify as classify,
)
from market.feeder.network import (
    flow_result as flow_result,
)
from market.feeder.network import (
    load_net as load_net,
)
from market.feeder.network import (
    map_participants as map_participants,
)
from market.feeder.network import (
    sensitivities as sensitivities,
)
from market.feeder.network import (
    worst as worst,
)
