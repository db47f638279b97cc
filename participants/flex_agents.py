"""Agents of the `/flex` namespace (docs/flexibility.md, *Agents*) over socket.io: prosumers,
an aggregator, a grid operator and the token operator, written from the wire contract alone
(plain payloads; nothing of `market.flexibility` is imported).

- `FlexSite`: a prosumer's site, the contract it registers, and its hidden behaviour (how
  often it accepts, how reliably it delivers: the simulation's truth, unknown to the
  aggregator).
- `ProsumerBrain` (pure): what a prosumer decides on its own: whether to answer an offer and
  how, and its meter reading over an allocated window. The in-process simulation and the
  socket agents use the same brain, so both make the same decisions; every random draw
  comes from a generator keyed by (seed, what, request number, site index).
- `FlexPeer`: one socket.io connection to `/flex` that times every acknowledgement.
- `ProsumerAgent`, `AggregatorAgent`, `GridOperatorAgent`, `TokenOperatorAgent`: the roles.
- `AgentHost`: the prosumer agents of one process, driven by commands (one JSON object a
  line). `python -m participants.flex_agents --url URL ...` serves them on stdin/stdout, so
  a controller can spread a large population over several load-generating processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import socketio

from market.core import wire
from participants.devices import Battery
from participants.spec import BatterySpec, PvSpec, WindSpec
from participants.synthetic import SolarProfile, WindProfile, stable_key

log = logging.getLogger("microte.flex_agents")

NAMESPACE = "/flex"
ANSWER, DELIVER = 5, 6  # keys of the per-decision generators (controller.flexsim uses 1-4 and 7)
EASY_PCT = 25  # asked for at most this % of its contract, a site delivers (the seed's simplification)
EASY_ODDS = 0.98
UTC = ZoneInfo("UTC")

SiteSource = Literal["solar", "wind", "bess"]


class FlexTerms(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `flex.contract.register` payload (docs/flexibility.md)."""

    aggregator: str
    source: str
    production: int
    consumption: int
    flex_up: int
    flex_down: int
    duration: int
    notice: int
    price_up: float
    price_down: float
    expires: int


class FlexSite(msgspec.Struct, frozen=True):
    """A prosumer site: its contract terms and its behaviour. `reliability` is the chance it
    delivers when asked for more than the 25 % everyone can (unknown to the aggregator:
    reputation and trust have to learn it); `accept` the chance it accepts an offer."""

    id: str
    index: int
    source: SiteSource
    joins: int  # seconds after the start
    terms: FlexTerms
    reliability: float
    accept: float
    pv: PvSpec | None = None
    wind: WindSpec | None = None
    battery: BatterySpec | None = None


class Behaviour(msgspec.Struct, frozen=True):
    seed: int
    answer_silent: float = 0.05  # chance an offer gets no answer
    meter_missing: float = 0.02  # chance an allocated site never meters


def keyed_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *key])


def request_number(request_id: str) -> int:
    """`fr12` -> 12 (request ids are `fr<n>`)."""
    digits = request_id.removeprefix("fr")
    return int(digits) if digits.isdigit() else 0


class ProsumerBrain:
    """A prosumer's own decisions (pure: no socket, no clock). It learns its contracts from
    replies and `flex.contract` notices and its allocations from `flex.allocation`."""

    def __init__(self, site: FlexSite, behaviour: Behaviour) -> None:
        self.site = site
        self.behaviour = behaviour
        self.contracts: dict[str, dict[str, Any]] = {}  # id -> latest version seen
        self.allocations: dict[str, dict[str, Any]] = {}  # request -> its `flex.allocation`
        self._generation: SolarProfile | WindProfile | None = None
        if site.pv is not None:
            self._generation = SolarProfile(site.pv, behaviour.seed, stable_key(site.id), UTC)
        elif site.wind is not None:
            self._generation = WindProfile(site.wind, behaviour.seed, stable_key(site.id), UTC)

    def on_contract(self, contract: Mapping[str, Any]) -> None:
        self.contracts[str(contract["id"])] = dict(contract)

    def on_allocation(self, allocation: Mapping[str, Any]) -> None:
        self.allocations[str(allocation["request"])] = dict(allocation)

    def answer(self, offer: Mapping[str, Any]) -> bool | None:
        """Accept (True), decline (False) or stay silent (None)."""
        rng = keyed_rng(self.behaviour.seed, ANSWER, request_number(offer["request"]), self.site.index)
        if rng.random() < self.behaviour.answer_silent:
            return None
        return bool(rng.random() < self.site.accept)

    def reading(self, request_id: str) -> dict[str, Any] | None:
        """The `flex.meter` payload of an allocated window (None: this site never meters it).

        Asked for at most 25 % of its contract a site delivers (98 %), beyond that with its
        reliability; a battery also needs the charge (up) or the room (down), and a solar or
        wind site cannot curtail more than it generates over the window (its profile, clouds
        and calm included). Delivering, it is within a few percent; failing, 0-80 %. The
        reading is the contract's baseline moved by what it delivered."""
        a = self.allocations[request_id]
        site = self.site
        rng = keyed_rng(self.behaviour.seed, DELIVER, request_number(request_id), site.index)
        if rng.random() < self.behaviour.meter_missing:
            return None
        start, end = int(a["start"]), int(a["end"])
        contract = self.contracts[str(a["contract"])]
        up = int(a["power"]) > 0
        expected = int(a["expected_wh"])
        capacity = int(contract["flex_up"] if up else contract["flex_down"])
        fraction = abs(int(a["power"])) / max(1, capacity)
        able = rng.random() < (EASY_ODDS if fraction <= EASY_PCT / 100 else site.reliability)
        if site.battery is not None:
            able = able and battery_can(site.battery, rng, expected, up, end - start)
        noise = float(rng.normal(0, 0.03))
        short = float(rng.uniform(0, 0.8))
        delivered = round(expected * (1 + noise)) if able else round(expected * short)
        if not up and self._generation is not None:
            delivered = min(delivered, self._generation.wh(start, end))  # curtail at most what it makes
        net = int(a["baseline_wh"]) + (delivered if up else -delivered)
        production = max(0, net + int(contract["consumption"]))
        return {
            "request": request_id,
            "time_interval": [start, end],
            "production": production,
            "consumption": production - net,
        }


def battery_can(spec: BatterySpec, rng: np.random.Generator, wh: int, up: bool, seconds: int) -> bool:
    """Whether a battery at a random state of charge can give (up) or take (down) `wh` in the window."""
    battery = msgspec.structs.replace(
        Battery.from_spec(spec), soc_wh=round(float(rng.uniform(0.1, 0.95)) * spec.capacity_wh)
    )
    if wh > battery.limit(seconds):
        return False
    return battery.soc_wh >= wh if up else battery.max_input() >= wh


# -- socket.io --------------------------------------------------------------------------------


class FlexError(Exception):
    def __init__(self, pid: str, event: str, reply: Any) -> None:
        super().__init__(f"{pid}: {event} refused: {reply}")
        self.reply = reply


class FlexPeer:
    """One participant's connection to `/flex`; `latency[event]` holds the seconds each
    acknowledgement took, `refused[code]` counts the refusals."""

    def __init__(self, pid: str, token: str, serializer: str = "json", timeout: float = 120.0) -> None:
        self.pid = pid
        self.token = token
        self.timeout = timeout
        self.sio = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
        self.latency: dict[str, list[float]] = {}
        self.refused: dict[str, int] = {}

    async def connect(self, url: str) -> None:
        await self.sio.connect(
            url,
            namespaces=[NAMESPACE],
            auth={"id": self.pid, "token": self.token},
            transports=["websocket"],
            wait_timeout=30,
        )

    async def disconnect(self) -> None:
        await self.sio.disconnect()

    def on(self, event: str, handler: Any) -> None:
        self.sio.on(event, handler, namespace=NAMESPACE)

    async def call(self, event: str, payload: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        reply: dict[str, Any] = await self.sio.call(event, payload, namespace=NAMESPACE, timeout=self.timeout)
        self.latency.setdefault(event, []).append(time.perf_counter() - t0)
        if not reply.get("ok"):
            code = str(reply.get("error", {}).get("code"))
            self.refused[code] = self.refused.get(code, 0) + 1
        return reply

    async def ok(self, event: str, payload: Any) -> dict[str, Any]:
        reply = await self.call(event, payload)
        if not reply.get("ok"):
            raise FlexError(self.pid, event, reply)
        return reply


class ProsumerAgent(FlexPeer):
    """A prosumer: registers its site's contract, answers every offer on its own (or stays
    silent), renegotiates and renews when its owner says so, meters its allocations."""

    def __init__(self, site: FlexSite, token: str, behaviour: Behaviour, serializer: str = "json") -> None:
        super().__init__(site.id, token, serializer)
        self.brain = ProsumerBrain(site, behaviour)
        self.silent = 0
        self._allocated: dict[str, asyncio.Event] = {}
        self.on("flex.offer", self._on_offer)
        self.on("flex.allocation", self._on_allocation)
        self.on("flex.contract", self._on_contract)

    async def _on_offer(self, offer: dict[str, Any]) -> None:
        accept = self.brain.answer(offer)
        if accept is None:
            self.silent += 1
            return
        await self.call("flex.answer", {"request": offer["request"], "accept": accept})

    async def _on_allocation(self, allocation: dict[str, Any]) -> None:
        self.brain.on_allocation(allocation)
        self._arrived(str(allocation["request"])).set()

    async def _on_contract(self, notice: dict[str, Any]) -> None:
        self.brain.on_contract(notice["contract"])

    def _arrived(self, request_id: str) -> asyncio.Event:
        return self._allocated.setdefault(request_id, asyncio.Event())

    async def register(self, terms: FlexTerms | None = None) -> dict[str, Any]:
        reply = await self.ok("flex.contract.register", msgspec.to_builtins(terms or self.brain.site.terms))
        self.brain.on_contract(reply["contract"])
        return reply

    async def renew(self, terms: FlexTerms) -> bool:
        """Register `terms` again if its contract has ended (not if it is still active)."""
        status = await self.ok("flex.status", {})
        if status["contract"] is not None:
            return False
        await self.register(terms)
        return True

    async def renegotiate(self, change: dict[str, Any]) -> dict[str, Any]:
        reply = await self.call("flex.contract.renegotiate", change)
        if reply.get("ok"):
            self.brain.on_contract(reply["contract"])
        return reply

    async def deliver(self, request_id: str, wait: float = 30.0) -> bool:
        """Meter an allocated window that has ended (after its `flex.allocation` arrived);
        False if this site sends no reading."""
        await asyncio.wait_for(self._arrived(request_id).wait(), wait)
        reading = self.brain.reading(request_id)
        if reading is None:
            return False
        await self.ok("flex.meter", reading)
        return True


class AggregatorAgent(FlexPeer):
    """The aggregator: chooses its strategy, reads its portfolio, settles requests whose
    readings did not all come, reads the aggregated results."""

    async def choose(self, settings: dict[str, Any]) -> dict[str, Any]:
        return await self.ok("flex.strategy", settings)

    async def status(self) -> dict[str, Any]:
        return await self.ok("flex.status", {})

    async def active_contracts(self) -> list[dict[str, Any]]:
        """Its active contracts, oldest first."""
        return [c for c in (await self.status())["contracts"] if c["status"] == "active"]

    async def settle(self, request_id: str) -> dict[str, Any]:
        """Settle after the window (`closed` if the last reading settled it already)."""
        return await self.call("flex.settle", {"request": request_id})

    async def results(self, request_id: str | None = None) -> dict[str, Any]:
        """Aggregated results: of one request, or of all. All of them come in pages (64
        requests, at most about 1 MB): this follows `next` to the last page and returns
        every request, in request order, the totals added up."""
        if request_id is not None:
            return await self.ok("flex.results", {"request": request_id})
        reply = await self.ok("flex.results", {})
        requests, totals = list(reply["requests"]), dict(reply["totals"])
        while reply.get("next") is not None:
            reply = await self.ok("flex.results", {"after": reply["next"]})
            requests += reply["requests"]
            for key, value in reply["totals"].items():
                totals[key] += value
        return {**reply, "requests": requests, "totals": totals}


class GridOperatorAgent(FlexPeer):
    """The grid operator (role `dso`): asks an aggregator for flexibility."""

    async def request(self, ask: dict[str, Any]) -> dict[str, Any]:
        return (await self.ok("flex.request", ask))["request"]  # type: ignore[no-any-return]


class TokenOperatorAgent(FlexPeer):
    """The market operator: mints aggregators' budgets (`flex.fund`), reads the token."""

    async def fund(self, aggregator: str, amount: int, fund_id: str) -> dict[str, Any]:
        return await self.ok("flex.fund", {"aggregator": aggregator, "amount": amount, "id": fund_id})

    async def status(self) -> dict[str, Any]:
        return await self.ok("flex.status", {})


# -- a process of prosumer agents -------------------------------------------------------------


class AgentHost:
    """The prosumer agents of one process. `handle(command)` runs one command:

    - `{"op": "join", "site": FlexSite, "token"}`: connect the site's agent, register its contract
    - `{"op": "renew", "index", "terms"}`: register again if its contract ended -> `{"renewed"}`
    - `{"op": "renegotiate", "index", "change"}`: -> `{"reply"}`
    - `{"op": "deliver", "request", "indices"}`: those allocated meter -> `{"metered"}`
    - `{"op": "stats"}`: `{"latency": {event: [ms]}, "refused": {code: n}, "silent", "agents"}`
    - `{"op": "close"}`: disconnect every agent
    """

    def __init__(self, url: str, behaviour: Behaviour, serializer: str = "json") -> None:
        self.url = url
        self.behaviour = behaviour
        self.serializer = serializer
        self.agents: dict[int, ProsumerAgent] = {}

    async def handle(self, command: Mapping[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "join":
            site = msgspec.convert(command["site"], FlexSite)
            agent = ProsumerAgent(site, str(command["token"]), self.behaviour, self.serializer)
            await agent.connect(self.url)
            self.agents[site.index] = agent
            return {"contract": (await agent.register())["contract"]}
        if op == "renew":
            terms = msgspec.convert(command["terms"], FlexTerms)
            return {"renewed": await self.agents[int(command["index"])].renew(terms)}
        if op == "renegotiate":
            return {"reply": await self.agents[int(command["index"])].renegotiate(dict(command["change"]))}
        if op == "deliver":
            rid = str(command["request"])
            done = await asyncio.gather(*(self.agents[int(i)].deliver(rid) for i in command["indices"]))
            return {"metered": sum(done)}
        if op == "stats":
            return self.stats()
        if op == "close":
            await asyncio.gather(*(a.disconnect() for a in self.agents.values()), return_exceptions=True)
            return {}
        raise ValueError(f"unknown command {op!r}")

    def stats(self) -> dict[str, Any]:
        latency: dict[str, list[float]] = {}
        refused: dict[str, int] = {}
        for a in self.agents.values():
            for event, values in a.latency.items():
                latency.setdefault(event, []).extend(round(v * 1000, 3) for v in values)
            for code, n in a.refused.items():
                refused[code] = refused.get(code, 0) + n
        return {
            "latency": latency,
            "refused": refused,
            "silent": sum(a.silent for a in self.agents.values()),
            "agents": len(self.agents),
        }


async def serve_stdio(host: AgentHost) -> None:
    """Commands on stdin, one JSON object a line (`{"n": k, "op": ...}`), replies on stdout
    in the same order (`{"n": k, "reply": {...}}` or `{"n": k, "error": "..."}`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    encode, decode = msgspec.json.Encoder().encode, msgspec.json.Decoder().decode
    out = sys.stdout.buffer
    while line := await reader.readline():
        command = decode(line)
        try:
            answer: dict[str, Any] = {"n": command.get("n"), "reply": await host.handle(command)}
        except Exception as exc:  # reported to the controller, which stops the run
            log.exception("command %s failed", command.get("op"))
            answer = {"n": command.get("n"), "error": f"{type(exc).__name__}: {exc}"}
        out.write(encode(answer) + b"\n")
        out.flush()
        if command.get("op") == "close":
            break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m participants.flex_agents", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--answer-silent", type=float, default=0.05)
    p.add_argument("--meter-missing", type=float, default=0.02)
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    behaviour = Behaviour(args.seed, args.answer_silent, args.meter_missing)
    host = AgentHost(args.url, behaviour, args.serializer)
    try:
        import uvloop

        uvloop.run(serve_stdio(host))
    except ImportError:  # pragma: no cover
        asyncio.run(serve_stdio(host))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
