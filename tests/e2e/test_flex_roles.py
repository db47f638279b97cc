"""`/flex` and ids holding several roles (docs/parity.md, *Several roles for one id*): an
id is every role it holds, not only the first one listed. Found: a prosumer could not sign
with an aggregator whose first role was `operator`; `flex.status` showed such an id only
its first role's view; a prosumer that is also an oracle was not offered requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ledger import open_sink
from market.core.registry import Registry
from market.server.app import MarketServer
from tests.e2e.conftest import serving
from tests.e2e.test_flex import CONFIG, T0, TOKENS, Peer, step, terms

ROLES = {"OPS": ["operator", "aggregator"], "P1": ["oracle", "prosumer"], "DSO": ["dso"], "CTL": ["controller"]}


def registry() -> Registry:
    return Registry.from_dict(
        {"participants": [{"id": p, "token": TOKENS[p], "roles": roles} for p, roles in ROLES.items()]}
    )


async def test_every_role_of_an_id_counts_on_flex(tmp_path: Path) -> None:
    server = MarketServer(CONFIG, registry(), open_sink(f"sqlite:///{tmp_path / 'f.db'}"))
    try:
        async with serving(server) as url:
            ctl = await Peer("CTL", "/simulation").connect(url)
            await step(ctl, T0)
            ops, p1, dso = [await Peer(p).connect(url) for p in ("OPS", "P1", "DSO")]
            # The operator that is also an aggregator: a prosumer may sign with it...
            got = await p1.ok("flex.contract.register", terms(aggregator="OPS", production=3000, flex_up=2000))
            assert got["contract"]["aggregator"] == "OPS"
            await ops.ok("flex.fund", {"aggregator": "OPS", "amount": 500_000, "id": "b1"})
            # ...its status shows both views (the token's supply and its contracts)...
            status = await ops.ok("flex.status", {})
            assert status["supply"] == 500_000 and [c["prosumer"] for c in status["contracts"]] == ["P1"]
            # ...and the oracle that is also a prosumer is offered the DSO's request.
            ask = {"aggregator": "OPS", "power": 1000, "start": T0 + 900, "end": T0 + 1800, "answer_within": 1.0}
            task = asyncio.ensure_future(dso.call("flex.request", ask))
            offer = await p1.next("flex.offer")
            assert offer["request"] == "fr1" and offer["aggregator"] == "OPS"
            await p1.ok("flex.answer", {"request": "fr1", "accept": True})
            reply = await task
            assert reply["ok"] and reply["request"]["accepted"] == ["P1"], reply
            assert [a["prosumer"] for a in reply["request"]["allocations"]] == ["P1"]
    finally:
        for peer in Peer.live:
            await peer.sio.disconnect()
        Peer.live.clear()
