"""One id, several roles (issue #19 item 3): the seed's DSO is also the market operator.

`roles = ["dso", "operator"]` admits the id to every namespace either role may use, and
each event still checks its own roles: the dso+operator id may set grid states and the
default LEM parameters; a dso-only id still may not do an operator's event."""

from __future__ import annotations

from typing import Any

import socketio

from ledger import open_sink
from market.community.namespace import NAMESPACE
from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.server.app import MarketServer
from tests.e2e.conftest import refusal, serving

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)
T = 1_699_963_200  # 12:00 UTC
Q = 900
ENTRIES: dict[str, tuple[str, list[str]]] = {  # id -> (token, roles)
    "DSO": ("tok-dso", ["dso", "operator"]),
    "GRID": ("tok-grid", ["dso"]),
    "AGG": ("tok-agg", ["aggregator"]),
    "P1": ("tok-p1", ["prosumer"]),
    "CTL": ("tok-ctl", ["controller"]),
}
DEFAULTS = {"grid_state": "GREEN", "pbBAU": 21.0, "psBAU": 6.0, "pbP2P": 14.0, "psP2P": 8.0, "beta": 0.0}


def registry() -> Registry:
    entries: list[dict[str, Any]] = []
    for pid, (token, roles) in ENTRIES.items():
        # both spellings: `role` for one role, `roles` for several
        entries.append({"id": pid, "token": token, **({"role": roles[0]} if len(roles) == 1 else {"roles": roles})})
    return Registry.from_dict({"participants": entries})


async def connect(url: str, pid: str, namespace: str = NAMESPACE) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    auth = {"id": pid, "token": ENTRIES[pid][0]}
    await sio.connect(url, namespaces=[namespace], auth=auth, transports=["websocket"], wait_timeout=5)
    return sio


async def call(sio: socketio.AsyncClient, event: str, payload: Any, namespace: str = NAMESPACE) -> dict[str, Any]:
    reply: dict[str, Any] = await sio.call(event, payload, namespace=namespace, timeout=10)
    return reply


async def test_a_dso_that_is_also_the_operator_may_do_both(ledger_url: str) -> None:
    server = MarketServer(CONFIG, registry(), open_sink(ledger_url))
    async with serving(server) as url:
        ctl = await connect(url, "CTL", "/simulation")
        assert (await ctl.call("step", {"time": T - 120}, namespace="/simulation", timeout=10))["ok"]
        dso, grid, p1 = await connect(url, "DSO"), await connect(url, "GRID"), await connect(url, "P1")
        state = {"time_delivery": [T, T + Q], "state": "YELLOW"}

        # dso + operator: the DSO's event and the operator's
        assert (await call(dso, "grid_state.set", state))["ok"]
        reply = await call(dso, "lem.defaults.set", DEFAULTS)
        assert reply["ok"] and reply["defaults"]["pbBAU"] == 21.0
        assert server.grid.core.defaults("GREEN") is not None
        assert server.grid.core.defaults("GREEN").pb_bau == 21.0  # type: ignore[union-attr]
        assert (await call(dso, "lem.solve", {"start": T, "end": T + Q}))["ok"]  # operator's too
        assert (await call(dso, "sla.solve", {"sla": "nope"}))["error"]["code"] == "not_found"  # allowed, no SLA

        # dso only: the DSO's event, and still none of the operator's
        assert (await call(grid, "grid_state.set", {**state, "state": "RED"}))["ok"]
        before = server.grid.core.snapshot()
        for event, payload in (
            ("lem.defaults.set", DEFAULTS),
            ("lem.solve", {"start": T, "end": T + Q}),
            ("sla.solve", {"sla": "nope"}),
            ("lem.set", {"time_delivery": [T, T + Q], "players": ["P1"]}),  # nor the aggregator's
        ):
            reply = await call(grid, event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == "forbidden", (event, reply)
            assert (await call(p1, event, payload))["error"]["code"] == "forbidden"
        assert (await call(p1, "grid_state.set", state))["error"]["code"] == "forbidden"
        assert server.grid.core.snapshot() == before

        # Namespaces admit an id by any role it holds: /balancing is the operator's alone.
        bal = await connect(url, "DSO", "/balancing")
        assert await refusal(url, "GRID", "/balancing", token=ENTRIES["GRID"][0]) == (
            "unauthorized: role dso may not use /balancing"
        )
        obs = await connect(url, "DSO", "/observe")
        for c in (ctl, dso, grid, p1, bal, obs):
            await c.disconnect()
