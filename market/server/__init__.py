"""The socket.io market server: the app and its round loop, and the `/market`, `/simulation` and
`/fleet` namespaces."""

from market.core.engine import (
    canonical_config as canonical_config,
)
from market.server.app import (
    MarketServer as MarketServer,
)
