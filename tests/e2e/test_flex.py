"""Seed 001 flexibility over real socket.io (namespace /flex): contracts, a grid operator's
requests, acceptances, allocation (fair, then reputation), delivery from meter data, rewards,
penalties and reputation on the ledger. Every number below is worked out by hand in the
comments (docs/flexibility.md has the formulas)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import socketio

from controller.sim import LISTENING
from ledger import open_sink, read_rows
from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.flexibility.namespace import NAMESPACE
from market.server.app import MarketServer
from participants.flex_agents import AggregatorAgent
from tests.e2e.conftest import refusal, serving

CONFIG = MarketConfig(duration=900, close_steps=2, round_timeout=2.0)
T0 = 1_800_000_000  # a multiple of 900
TOKENS = {p: f"tok-{p.lower()}" for p in ("AGG", "DSO", "CTL", "OPS", "P1", "P2", "P3", "P4")}
ROLE_OF = {"AGG": "aggregator", "DSO": "dso", "CTL": "controller", "OPS": "operator"}
EVENTS = (
    "flex.offer",
    "flex.allocation",
    "flex.displaced",
    "flex.delivery",
    "flex.settled",
    "flex.contract",
    "flex.tokens",
)
BUDGET = {"aggregator": "AGG", "amount": 1_000_000, "id": "budget-1"}  # the operator mints the aggregator's budget


def registry() -> Registry:
    return Registry.from_dict(
        {"participants": [{"id": p, "token": t, "role": ROLE_OF.get(p, "prosumer")} for p, t in TOKENS.items()]}
    )


@asynccontextmanager
async def running(ledger_url: str) -> AsyncIterator[tuple[str, MarketServer]]:
    server = MarketServer(CONFIG, registry(), open_sink(ledger_url))
    try:
        async with serving(server) as url:
            yield url, server
    finally:
        for peer in Peer.live:  # a failed assertion must not leave clients behind
            await peer.sio.disconnect()
        Peer.live.clear()


class Peer:
    """A real socket.io client on one namespace, with a queue per server event."""

    live: ClassVar[list[Peer]] = []

    def __init__(self, pid: str, namespace: str = NAMESPACE) -> None:
        self.pid = pid
        self.namespace = namespace
        self.sio = socketio.AsyncClient(reconnection=False)
        self.inbox: dict[str, asyncio.Queue[Any]] = {e: asyncio.Queue() for e in EVENTS}
        for e in EVENTS:
            self.sio.on(e, self._collector(e), namespace=namespace)

    def _collector(self, event: str) -> Callable[[Any], Any]:
        async def collect(data: Any) -> None:
            self.inbox[event].put_nowait(data)

        return collect

    async def connect(self, url: str) -> Peer:
        await self.sio.connect(
            url,
            namespaces=[self.namespace],
            auth={"id": self.pid, "token": TOKENS[self.pid]},
            transports=["websocket"],
            wait_timeout=5,
        )
        Peer.live.append(self)
        return self

    async def call(self, event: str, payload: Any) -> dict[str, Any]:
        reply: dict[str, Any] = await self.sio.call(event, payload, namespace=self.namespace, timeout=10)
        return reply

    async def ok(self, event: str, payload: Any) -> dict[str, Any]:
        reply = await self.call(event, payload)
        assert reply["ok"] is True, (self.pid, event, payload, reply)
        return reply

    async def next(self, event: str) -> Any:
        return await asyncio.wait_for(self.inbox[event].get(), 5)

    def drain(self, event: str) -> list[Any]:
        out = []
        while not self.inbox[event].empty():
            out.append(self.inbox[event].get_nowait())
        return out


def terms(**kw: Any) -> dict[str, Any]:
    base = {
        "aggregator": "AGG",
        "source": "solar",
        "production": 0,
        "consumption": 0,
        "flex_up": 1000,
        "flex_down": 0,
        "duration": 3600,
        "notice": 300,
        "price_up": 0.2,
        "price_down": 0.1,
        "expires": T0 + 86400,
    }
    return base | kw


async def step(ctl: Peer, t: int) -> None:
    await ctl.ok("step", {"time": t})


@pytest.fixture(params=["sqlite", "evm+sqlite"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test on a database ledger and on a chain ledger (its token moves settled on chain)."""
    return f"{request.param}:///{tmp_path}/ledger.db"


async def test_requests_allocation_delivery_rewards_and_reputation(ledger_url: str) -> None:
    async with running(ledger_url) as (url, _server):
        ctl = await Peer("CTL", "/simulation").connect(url)
        await step(ctl, T0)
        agg, dso, ops = [await Peer(p).connect(url) for p in ("AGG", "DSO", "OPS")]
        p1, p2, p3, p4 = [await Peer(p).connect(url) for p in ("P1", "P2", "P3", "P4")]
        funded = await ops.ok("flex.fund", BUDGET)
        assert funded["tokens"] == 1_000_000
        assert (await agg.next("flex.tokens"))["amount"] == 1_000_000

        # -- contracts: P1 solar, P2 battery, P3 wind (expires at T0+3600), P4 solar ------------
        c1 = (
            await p1.ok(
                "flex.contract.register",
                terms(production=4000, consumption=500, flex_up=2000, flex_down=1000, notice=600, price_up=0.30),
            )
        )["contract"]
        assert c1["id"] == "fc1" and c1["status"] == "active" and c1["version"] == 1
        await p2.ok(
            "flex.contract.register",
            terms(source="bess", consumption=1000, flex_up=4000, flex_down=4000, price_up=0.25, price_down=0.05),
        )
        await p3.ok("flex.contract.register", terms(source="wind", production=3000, expires=T0 + 3600))
        await p4.ok("flex.contract.register", terms(production=1000, flex_up=500))
        assert (await agg.next("flex.contract"))["contract"]["id"] == "fc1"  # the aggregator is told

        # -- request 1, +1000 W over [T0+900, T0+1800], strategy fair (the default) -----------
        ask1 = {"aggregator": "AGG", "power": 1000, "start": T0 + 900, "end": T0 + 1800, "answer_within": 1.0}
        pending = asyncio.ensure_future(dso.call("flex.request", ask1))
        offers = {p.pid: await p.next("flex.offer") for p in (p1, p2, p3, p4)}
        assert offers["P1"] == {
            "request": "fr1",
            "aggregator": "AGG",
            "direction": "up",
            "power": 1000,
            "start": T0 + 900,
            "end": T0 + 1800,
            "answer_within": 1.0,
            "capacity": 2000,
            "price": 0.30,
        }
        assert (await p1.ok("flex.answer", {"request": "fr1", "accept": True}))["answer"] == "accept"
        await p2.ok("flex.answer", {"request": "fr1", "accept": True})
        await p3.ok("flex.answer", {"request": "fr1", "accept": False})
        # P4 stays silent: after the 1 s deadline it counts as declined.
        req1 = (await pending)["request"]
        # Fair: capacities 2000 and 4000 (total 6000), limits 25 %: 500 and 1000 (room 1500 > 1000).
        # 1000*2000/6000 = 333 r 2000, 1000*4000/6000 = 666 r 4000: one W left goes to the
        # larger remainder (P2). Expected Wh over 900 s: 333/4 = 83.25 -> 83, 667/4 = 166.75 -> 167.
        # Baselines: P1 (4000-500)/4 = 875 Wh, P2 -1000/4 = -250 Wh.
        assert req1["allocations"] == [
            {"prosumer": "P1", "power": 333, "expected_wh": 83, "baseline_wh": 875},
            {"prosumer": "P2", "power": 667, "expected_wh": 167, "baseline_wh": -250},
        ]
        assert (req1["accepted"], req1["declined"], req1["silent"]) == (["P1", "P2"], ["P3"], ["P4"])
        assert (req1["allocated"], req1["shortfall"], req1["reason"], req1["strategy"]) == (1000, 0, None, "fair")
        assert (await p1.next("flex.allocation"))["power"] == 333
        assert (await p2.next("flex.allocation"))["expected_wh"] == 167

        # A meter reading before the window ends is refused; after it, accepted.
        early = await p1.call(
            "flex.meter", {"request": "fr1", "time_interval": [T0 + 900, T0 + 1800], "production": 1, "consumption": 0}
        )
        assert early["ok"] is False and early["error"]["code"] == "invalid"
        await step(ctl, T0 + 1800)
        # P1 nets 1080 - 125 = 955 Wh: delivered 955 - 875 = 80 of 83; 100*3 <= 10*83: met.
        # reward round(80 * 0.30 * 1000) = 24000 micro; reputation 100 + 2 + 10 = 112.
        got = await p1.ok(
            "flex.meter",
            {"request": "fr1", "time_interval": [T0 + 900, T0 + 1800], "production": 1080, "consumption": 125},
        )
        assert got == {"ok": True, "settled": False}
        # P2 nets -200 Wh: delivered -200 - (-250) = 50 of 167; deviation 117 > 16.7: not met.
        # reward round(50 * 0.25 * 1000) = 12500, penalty round(117 * 0.25 * 1000) = 29250, of
        # which it pays what it holds, its 12500 (no balance goes negative);
        # reputation 100 + 2 - 10 = 92. The last reading settles the request.
        got = await p2.ok(
            "flex.meter",
            {"request": "fr1", "time_interval": [T0 + 900, T0 + 1800], "production": 0, "consumption": 200},
        )
        assert got == {"ok": True, "settled": True}
        d1, d2 = await p1.next("flex.delivery"), await p2.next("flex.delivery")
        assert (d1["delivered_wh"], d1["met"], d1["reward"], d1["penalty"], d1["reputation"], d1["tokens"]) == (
            80,
            True,
            24000,
            0,
            112,
            24000,
        )
        assert (d2["delivered_wh"], d2["met"], d2["reward"], d2["penalty"], d2["reputation"], d2["tokens"]) == (
            50,
            False,
            12500,
            29250,
            92,
            0,
        )
        assert (d1["penalty_paid"], d2["penalty_paid"]) == (0, 12500)
        settled = (await agg.next("flex.settled"))["request"]
        assert (settled["delivered_wh"], settled["rewards"], settled["penalties"]) == (130, 36500, 29250)
        assert (await dso.next("flex.settled"))["request"]["id"] == "fr1"

        # -- request 2, +2500 W over [T0+2700, T0+3600], strategy reputation ---------------
        assert (await agg.ok("flex.strategy", {"strategy": "reputation"}))["strategy"] == "reputation"
        ask2 = {"aggregator": "AGG", "power": 2500, "start": T0 + 2700, "end": T0 + 3600, "id": "dso-2"}
        pending = asyncio.ensure_future(dso.call("flex.request", ask2))
        for p, yes in ((p1, True), (p2, True), (p3, True), (p4, False)):
            offer = await p.next("flex.offer")
            await p.ok("flex.answer", {"request": offer["request"], "accept": yes})
        req2 = (await pending)["request"]  # everyone answered: no waiting for the deadline
        # Scores = reputation - round(100 * price): P1 114 - 30 = 84, P3 102 - 20 = 82,
        # P2 94 - 25 = 69. P1 gets its 2000 W, P3 the remaining 500 W, P2 is displaced.
        assert req2["allocations"] == [
            {"prosumer": "P1", "power": 2000, "expected_wh": 500, "baseline_wh": 875},
            {"prosumer": "P3", "power": 500, "expected_wh": 125, "baseline_wh": 750},
        ]
        assert req2["displaced"] == ["P2"] and req2["strategy"] == "reputation"
        displaced = await p2.next("flex.displaced")
        assert displaced["request"] == "fr2" and "reputation" in displaced["reason"]
        again = await dso.call("flex.request", ask2)  # a retried request: same answer
        assert again["duplicate"] is True and again["request"]["allocations"] == req2["allocations"]

        await step(ctl, T0 + 3600)  # P3's contract expires now
        # P1 delivers exactly 500 Wh: met, reward 500 * 0.30 = 150000 micro, reputation 124.
        await p1.ok(
            "flex.meter",
            {"request": "fr2", "time_interval": [T0 + 2700, T0 + 3600], "production": 1500, "consumption": 125},
        )
        # P3 sends nothing; the aggregator settles: not delivered, penalty 125 * 0.20 = 25000,
        # of which P3, holding nothing, pays nothing.
        res = (await agg.ok("flex.settle", {"request": "fr2"}))["request"]
        assert [(d["prosumer"], d["met"], d["reward"], d["penalty"], d["reputation"]) for d in res["deliveries"]] == [
            ("P1", True, 150000, 0, 124),
            ("P3", False, 0, 25000, 92),
        ]
        expired = await p3.next("flex.contract")
        while expired["event"] != "expired":
            expired = await p3.next("flex.contract")
        assert expired["contract"]["id"] == "fc3"

        # A downward renegotiation costs 5 reputation points; P4 cancels.
        reneg = await p2.ok("flex.contract.renegotiate", {"id": "fc2", "flex_up": 3000})
        assert (reneg["downward"], reneg["reputation"], reneg["contract"]["version"]) == (True, 89, 2)
        assert (await p4.ok("flex.contract.cancel", {"id": "fc4"}))["contract"]["status"] == "cancelled"

        # -- what the aggregator reads back ----------------------------------------------
        results = await agg.ok("flex.results", {})
        # requested 1000/4 + 2500/4 = 250 + 625 Wh; credited 80 + 50 + 500 + 0.
        assert results["totals"] == {
            "requests": 2,
            "requested_wh": 875,
            "expected_wh": 83 + 167 + 500 + 125,
            "delivered_wh": 630,
            "met": 2,
            "failed": 2,
            "rewards": 24000 + 12500 + 150000,
            "penalties": 29250 + 25000,
        }
        status = await agg.ok("flex.status", {})
        assert [(s["id"], s["reputation"], s["tokens"]) for s in status["prosumers"]] == [
            ("P1", 124, 174000),
            ("P2", 89, 0),
            ("P3", 92, 0),
            ("P4", 100, 0),
        ]
        # the budget less the rewards paid, plus the penalty collected
        assert (status["tokens"], status["reserved"]) == (1_000_000 - 174000 - 12500 + 12500, 0)
        supply = await ops.ok("flex.status", {})
        assert supply == {"ok": True, "supply": 1_000_000, "balances": {"AGG": 826000, "P1": 174000}}
        assert [c["status"] for c in status["contracts"]] == ["active", "active", "expired", "cancelled"]
        mine = await p1.ok("flex.status", {})
        assert (mine["reputation"], mine["tokens"], mine["contract"]["id"]) == (124, 174000, "fc1")
        for p in (ctl, agg, dso, ops, p1, p2, p3, p4):
            await p.sio.disconnect()

    # -- the ledger holds all of it --------------------------------------------------------
    contracts = read_rows(ledger_url, "flex_contracts")
    assert [(r["id"], r["event"], r["downward"]) for r in contracts] == [
        ("fc1.1", "registered", False),
        ("fc2.1", "registered", False),
        ("fc2.2", "renegotiated", True),
        ("fc3.1", "registered", False),
        ("fc3.2", "expired", False),
        ("fc4.1", "registered", False),
        ("fc4.2", "cancelled", False),
    ]
    requests = read_rows(ledger_url, "flex_requests")
    assert [(r["id"], r["strategy"], r["offered"], r["accepted"], r["allocated"]) for r in requests] == [
        ("fr1", "fair", 4, 2, 1000),
        ("fr2", "reputation", 4, 3, 2500),
    ]
    answers = {r["id"]: r["answer"] for r in read_rows(ledger_url, "flex_answers")}
    assert answers == {
        "fr1.P1": "accept",
        "fr1.P2": "accept",
        "fr1.P3": "decline",
        "fr1.P4": "silent",
        "fr2.P1": "accept",
        "fr2.P2": "accept",
        "fr2.P3": "accept",
        "fr2.P4": "decline",
    }
    allocations = {r["id"]: (r["status"], r["power"]) for r in read_rows(ledger_url, "flex_allocations")}
    assert allocations == {
        "fr1.P1": ("allocated", 333),
        "fr1.P2": ("allocated", 667),
        "fr2.P1": ("allocated", 2000),
        "fr2.P2": ("displaced", 0),
        "fr2.P3": ("allocated", 500),
    }
    deliveries = {
        r["id"]: (r["delivered"], r["met"], r["reward"], r["penalty"]) for r in read_rows(ledger_url, "flex_deliveries")
    }
    assert deliveries == {
        "fr1.P1": (80, True, 24000, 0),
        "fr1.P2": (50, False, 12500, 29250),
        "fr2.P1": (500, True, 150000, 0),
        "fr2.P3": (0, False, 0, 25000),
    }
    tokens = [(r["id"], r["from_id"], r["to_id"], r["amount"]) for r in read_rows(ledger_url, "flex_tokens")]
    assert tokens == [
        ("fr1.P1.reward", "AGG", "P1", 24000),
        ("fr1.P2.penalty", "P2", "AGG", 12500),  # 29250 assessed, what it held collected
        ("fr1.P2.reward", "AGG", "P2", 12500),
        ("fr2.P1.reward", "AGG", "P1", 150000),
        ("fund/AGG/budget-1", "", "AGG", 1_000_000),  # minted by the operator (from nobody)
    ]
    reputation = [(r["id"], r["reason"], r["delta"], r["score"]) for r in read_rows(ledger_url, "flex_reputation")]
    assert reputation == [
        ("P1.1", "participation", 2, 102),
        ("P1.2", "compliance", 10, 112),
        ("P1.3", "participation", 2, 114),
        ("P1.4", "compliance", 10, 124),
        ("P2.1", "participation", 2, 102),
        ("P2.2", "penalty", -10, 92),
        ("P2.3", "participation", 2, 94),
        ("P2.4", "renegotiation", -5, 89),
        ("P3.1", "participation", 2, 102),
        ("P3.2", "penalty", -10, 92),
    ]
    if ledger_url.startswith("evm+"):  # rewards, penalties and the budget are token moves on chain
        from controller.ledger_cmd import balances, verify

        report = verify(ledger_url)
        assert report.ok, (report.problems, report.unanchored, report.tampered)
        chain = balances(ledger_url)
        assert chain.ok and chain.unanchored_rows == 0, chain
        held = {a.who: a.chain for a in chain.accounts}
        assert (held["AGG"], held["P1"], held.get("P2", 0), held.get("P3", 0)) == (826000, 174000, 0, 0)
        assert held["clearing"] == -1_000_000  # the minted budget is the clearing account's credit
        outsider = Path(__file__).resolve().parents[2] / "docs" / "verify_ledger.py"
        done = subprocess.run([sys.executable, str(outsider), ledger_url], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "OK:" in done.stdout, done.stdout + done.stderr


async def test_refusals_change_nothing_and_roles_are_enforced(ledger_url: str) -> None:
    async with running(ledger_url) as (url, server):
        assert (await refusal(url, "CTL", NAMESPACE, token=TOKENS["CTL"])).startswith("unauthorized")
        assert (await refusal(url, "P1", NAMESPACE, token="wrong")).startswith("unauthorized")
        p1, dso, agg, ops = [await Peer(p).connect(url) for p in ("P1", "DSO", "AGG", "OPS")]
        await p1.ok("flex.contract.register", terms())
        before = await p1.ok("flex.status", {})
        bad: list[tuple[Peer, str, Any, str]] = [
            (p1, "flex.contract.register", terms(flex_up=5), "conflict"),
            (p1, "flex.contract.register", terms(aggregator="DSO"), "not_found"),
            (p1, "flex.contract.register", terms(flex_up=True), "invalid"),
            (p1, "flex.contract.register", terms(price_up=float("nan")), "invalid"),
            (p1, "flex.contract.register", {**terms(), "extra": 1}, "invalid"),
            (p1, "flex.contract.renegotiate", {"id": "fc9", "flex_up": 5}, "not_found"),
            (p1, "flex.contract.renegotiate", {"id": "fc1", "flex_up": -5}, "invalid"),
            (p1, "flex.contract.cancel", {"id": "fc9"}, "not_found"),
            (p1, "flex.request", {"aggregator": "AGG", "power": 100, "start": 900, "end": 1800}, "forbidden"),
            (dso, "flex.request", {"aggregator": "AGG", "power": 0, "start": 900, "end": 1800}, "invalid"),
            (dso, "flex.request", {"aggregator": "AGG", "power": 100, "start": 900, "end": 1000}, "invalid"),
            (dso, "flex.request", {"aggregator": "P1", "power": 100, "start": 900, "end": 1800}, "not_found"),
            (p1, "flex.answer", {"request": "fr9", "accept": True}, "not_found"),
            (p1, "flex.answer", {"request": "fr9", "accept": 1}, "invalid"),
            (agg, "flex.strategy", {"strategy": "lottery"}, "invalid"),
            (p1, "flex.strategy", {"strategy": "fair"}, "forbidden"),
            (agg, "flex.settle", {"request": "fr9"}, "not_found"),
            (p1, "flex.results", {}, "forbidden"),
            (p1, "flex_answer", {"request": "fr1", "accept": True}, "invalid"),  # only the dotted name exists
            (p1, "flex.nonsense", {}, "invalid"),
            (p1, "flex.meter", "not an object", "invalid"),
            # tokens: only the operator mints, to an aggregator; nobody spends what it does not hold
            (p1, "flex.fund", BUDGET, "forbidden"),
            (ops, "flex.fund", BUDGET | {"aggregator": "P1"}, "not_found"),
            (ops, "flex.fund", BUDGET | {"amount": 0}, "invalid"),
            (ops, "flex.fund", {"aggregator": "AGG", "amount": 5}, "invalid"),  # an id is required
            (p1, "flex.transfer", {"to": "DSO", "amount": 1, "id": "t1"}, "invalid"),  # holds nothing
            (agg, "flex.transfer", {"to": "P1", "amount": 1, "id": "t1"}, "invalid"),
            (p1, "flex.transfer", {"to": "NOBODY", "amount": 1, "id": "t1"}, "not_found"),
            (p1, "flex.transfer", {"to": "DSO", "amount": -1, "id": "t1"}, "invalid"),
        ]
        for peer, event, payload, code in bad:
            reply = await peer.call(event, payload)
            assert reply["ok"] is False and reply["error"]["code"] == code, (event, payload, reply)
        overdraw = await agg.call("flex.transfer", {"to": "P1", "amount": 1, "id": "t1"})
        assert overdraw["error"]["message"] == "insufficient tokens: AGG holds 0, cannot transfer 1"
        dup = await p1.ok("flex.contract.register", terms())
        assert dup["duplicate"] is True
        assert await p1.ok("flex.status", {}) == before
        # An event whose records cannot be made durable is refused and undone.
        write = server.sink.write

        async def failing(_batch: Any) -> None:
            raise OSError("disk full")

        server.sink.write = failing  # type: ignore[method-assign]
        reply = await p1.call("flex.contract.renegotiate", {"id": "fc1", "flex_up": 10})
        assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
        server.sink.write = write  # type: ignore[method-assign]
        assert await p1.ok("flex.status", {}) == before
        # A request nobody can serve is answered at once, with its reason.
        req = (await dso.ok("flex.request", {"aggregator": "AGG", "power": -100, "start": 900, "end": 1800}))["request"]
        assert (req["offered"], req["allocated"], req["shortfall"], req["status"]) == ([], 0, 100, "settled")
        assert req["reason"] == "no eligible prosumer is reachable"  # P1 guarantees no downward flexibility
        for p in (p1, dso, agg, ops):
            await p.sio.disconnect()
    assert [r["id"] for r in read_rows(ledger_url, "flex_contracts")] == ["fc1.1"]
    assert read_rows(ledger_url, "flex_tokens") == []


# -- flex.results comes in pages -----------------------------------------------------------------


async def test_results_come_in_pages_and_the_aggregator_agent_reads_them_all(tmp_path: Path) -> None:
    """`flex.results {}` answers the first page (64 requests), `next` pages on to the last
    (`next` null); the aggregator agent follows it to the end. Bad paging input is `invalid`
    and changes nothing."""
    async with running(f"sqlite:///{tmp_path}/ledger.db") as (url, _server):
        agg, dso = [await Peer(p).connect(url) for p in ("AGG", "DSO")]
        # Nobody holds a contract: each request is answered at once, offered to nobody.
        for k in range(70):
            await dso.ok("flex.request", {"aggregator": "AGG", "power": 100 + 4 * k, "start": 900, "end": 1800})
        first = await agg.ok("flex.results", {})  # the request of an existing client: the first page
        assert len(first["requests"]) == 64 and first["next"] == "fr64"
        rest = await agg.ok("flex.results", {"after": first["next"]})
        assert [r["id"] for r in rest["requests"]] == [f"fr{k}" for k in range(65, 71)] and rest["next"] is None
        assert (await dso.ok("flex.results", {"limit": 512}))["requests"] == first["requests"] + rest["requests"]

        for bad in (
            {"limit": 0},
            {"limit": -1},
            {"limit": 513},
            {"limit": True},
            {"limit": "64"},
            {"after": 64},
            {"after": "fr999"},
            {"request": "fr1", "after": "fr1"},
            {"cursor": "fr1"},
        ):
            reply = await agg.call("flex.results", bad)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid", (bad, reply)
        cursor = await agg.call("flex.results", {"after": "fr999"})
        assert cursor["error"]["message"] == (
            "unknown cursor: after='fr999' is none of your requests (pass a reply's `next`)"
        )
        assert await agg.ok("flex.results", {}) == first
        await agg.sio.disconnect()  # the agent logs in as AGG (a second login replaces the first)
        agent = AggregatorAgent("AGG", TOKENS["AGG"])
        await agent.connect(url)
        try:
            every = await agent.results()
        finally:
            await agent.disconnect()
        assert [r["id"] for r in every["requests"]] == [f"fr{k}" for k in range(1, 71)]
        assert every["requests"] == first["requests"] + rest["requests"]
        # requested (100 + 4k) W over 900 s: 25 + k Wh each
        assert every["totals"]["requests"] == 70 and every["totals"]["requested_wh"] == sum(25 + k for k in range(70))
        assert every["totals"] == {key: first["totals"][key] + rest["totals"][key] for key in first["totals"]}


# -- restart: what /flex served before a kill -9 it serves after -------------------------------

FLEX_TABLES = (
    "flex_contracts",
    "flex_requests",
    "flex_answers",
    "flex_allocations",
    "flex_deliveries",
    "flex_tokens",
    "flex_reputation",
)


async def start_market(tmp: Path, ledger: str) -> tuple[asyncio.subprocess.Process, str]:
    """`microte market` as a subprocess on an ephemeral port, on `ledger`; returns it and its URL."""
    reg = tmp / "registry.toml"
    reg.write_text(
        "".join(
            f'[[participants]]\nid = "{p}"\ntoken = "{t}"\nrole = "{ROLE_OF.get(p, "prosumer")}"\n'
            for p, t in TOKENS.items()
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "controller", "market", "--registry", str(reg), "--port", "0", "--ledger", ledger),
        *("--duration", str(CONFIG.duration), "--round-timeout", "1", "--log-level", "WARNING"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith(LISTENING), line
    return proc, line.removeprefix(LISTENING).strip()


async def kill9(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


def ledger_ids(ledger: str) -> dict[str, list[str]]:
    return {t: sorted(r["id"] for r in read_rows(ledger, t)) for t in FLEX_TABLES}


async def served(peers: dict[str, Peer]) -> dict[str, Any]:
    """Everything /flex serves the aggregator, the dso and each prosumer."""
    return {
        "agg.results": await peers["AGG"].ok("flex.results", {}),
        "dso.results": await peers["DSO"].ok("flex.results", {}),
        "agg.status": await peers["AGG"].ok("flex.status", {}),
        "ops.status": await peers["OPS"].ok("flex.status", {}),  # the token's supply and balances
        **{f"{p}.status": await peers[p].ok("flex.status", {}) for p in ("P1", "P2", "P3", "P4")},
        **{f"{r}.result": await peers["DSO"].ok("flex.results", {"request": r}) for r in ("fr1", "fr2", "fr3")},
    }


async def request(peers: dict[str, Peer], ask: dict[str, Any], answers: dict[str, bool | None]) -> dict[str, Any]:
    """A dso request; each offered prosumer answers as `answers` says (None: silent)."""
    pending = asyncio.ensure_future(peers["DSO"].call("flex.request", ask))
    for pid, yes in answers.items():
        offer = await peers[pid].next("flex.offer")
        if yes is not None:
            await peers[pid].ok("flex.answer", {"request": offer["request"], "accept": yes})
    reply = await pending
    assert reply["ok"] is True, reply
    return reply


async def test_state_survives_a_kill9_restart_and_retries_get_their_first_reply(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path}/ledger.db"
    proc, url = await start_market(tmp_path, ledger)
    try:
        peers = {p: await Peer(p, "/simulation" if p == "CTL" else NAMESPACE).connect(url) for p in TOKENS}
        await step(peers["CTL"], T0)
        await peers["OPS"].ok("flex.fund", BUDGET)
        p1 = terms(production=4000, consumption=500, flex_up=2000, flex_down=1000, notice=600, price_up=0.30)
        await peers["P1"].ok("flex.contract.register", p1)
        p2 = terms(source="bess", consumption=1000, flex_up=4000, flex_down=4000, price_up=0.25, price_down=0.05)
        await peers["P2"].ok("flex.contract.register", p2)
        await peers["P3"].ok("flex.contract.register", terms(source="wind", production=3000))
        await peers["P4"].ok("flex.contract.register", terms(production=1000, flex_up=500))

        # fr1, fair: P1 333 W, P2 667 W (the worked example); P3 declines, P4 silent.
        ask1 = {"aggregator": "AGG", "power": 1000, "start": T0 + 900, "end": T0 + 1800, "answer_within": 1.0}
        first1 = await request(peers, ask1, {"P1": True, "P2": True, "P3": False, "P4": None})
        await step(peers["CTL"], T0 + 1800)
        window1 = [T0 + 900, T0 + 1800]
        meter1 = {"request": "fr1", "time_interval": window1, "production": 1080, "consumption": 125}
        await peers["P1"].ok("flex.meter", meter1)
        await peers["P2"].ok("flex.meter", {**meter1, "production": 0, "consumption": 200})
        # fr2, reputation, a client id: P1 2000 W, P3 500 W, P2 displaced; settled by the aggregator.
        await peers["AGG"].ok("flex.strategy", {"strategy": "reputation"})
        ask2 = {"aggregator": "AGG", "power": 2500, "start": T0 + 2700, "end": T0 + 3600, "id": "dso-2"}
        first2 = await request(peers, ask2, {"P1": True, "P2": True, "P3": True, "P4": False})
        assert [a["prosumer"] for a in first2["request"]["allocations"]] == ["P1", "P3"]
        await step(peers["CTL"], T0 + 3600)
        meter2 = {"request": "fr2", "time_interval": [T0 + 2700, T0 + 3600], "production": 1500, "consumption": 125}
        await peers["P1"].ok("flex.meter", meter2)
        await peers["AGG"].ok("flex.settle", {"request": "fr2"})
        # fr3, still to deliver at the crash: P2 alone, 500 W down.
        ask3 = {"aggregator": "AGG", "power": -500, "start": T0 + 4500, "end": T0 + 5400, "id": "dso-3"}
        first3 = await request(peers, ask3, {"P1": False, "P2": True})
        assert first3["request"]["status"] == "allocated"
        await peers["P2"].ok("flex.contract.renegotiate", {"id": "fc2", "flex_up": 3000})  # downward: -5
        await peers["P4"].ok("flex.contract.cancel", {"id": "fc4"})

        before = await served(peers)
        assert before["agg.results"]["totals"] == {
            "requests": 3,
            "requested_wh": 250 + 625 + 125,
            "expected_wh": 83 + 167 + 500 + 125 + 125,
            "delivered_wh": 80 + 50 + 500,
            "met": 2,
            "failed": 2,
            "rewards": 24000 + 12500 + 150000,
            "penalties": 29250 + 25000,
        }
        retried2 = await peers["DSO"].call("flex.request", ask2)
        assert retried2 == first2 | {"duplicate": True}  # its first reply, though settled since
        rows = ledger_ids(ledger)
        await kill9(proc)  # no graceful shutdown, no flush
        for peer in Peer.live:
            await peer.sio.disconnect()
        Peer.live.clear()

        proc, url = await start_market(tmp_path, ledger)
        peers = {p: await Peer(p, "/simulation" if p == "CTL" else NAMESPACE).connect(url) for p in TOKENS}
        after = await served(peers)
        # The aggregator's strategy choice is not kept across restarts (docs/flexibility.md).
        assert after["agg.status"]["strategy"] == "fair"
        after["agg.status"]["strategy"] = before["agg.status"]["strategy"]
        assert after == before
        for ask, first in ((ask1, first1), (ask2, first2), (ask3, first3)):
            if "id" in ask:  # a retried client id gets its first reply
                assert await peers["DSO"].call("flex.request", ask) == first | {"duplicate": True}
        assert await peers["P1"].call("flex.meter", meter1) == {"ok": True, "duplicate": True}
        assert ledger_ids(ledger) == rows  # retries stored nothing
        # The allocation made before the crash settles after it: P2 consumes 375 Wh against a
        # baseline of 250 (net -250): 125 Wh more consumption, as asked: met.
        await step(peers["CTL"], T0 + 5400)
        meter3 = {"request": "fr3", "time_interval": [T0 + 4500, T0 + 5400], "production": 0, "consumption": 375}
        assert await peers["P2"].ok("flex.meter", meter3) == {"ok": True, "settled": True}
        settled = (await peers["DSO"].ok("flex.results", {"request": "fr3"}))["requests"][0]
        assert (settled["status"], settled["delivered_wh"], settled["met"]) == ("settled", 125, 1)
        for peer in Peer.live:
            await peer.sio.disconnect()
        Peer.live.clear()
    finally:
        await kill9(proc)
        for peer in Peer.live:
            await peer.sio.disconnect()
        Peer.live.clear()
