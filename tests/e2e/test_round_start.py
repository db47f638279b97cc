"""`auth.round_start` (docs/protocol.md, *Results with the next round*): in sim mode a
combined session's `round.result` rides with the next round's start as one `round.start`,
carrying exactly what the `round.result` would have, in the same order and numbering; with
no step within `CARRY_SECONDS` it goes as `round.result` after all."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import socketio

from ledger import ledger_digest
from market.core.engine import MarketConfig
from market.server.app import CARRY_SECONDS
from participants.client import ParticipantClient
from participants.prosumer import Prosumer
from participants.spec import decode_spec
from tests.e2e.conftest import TOKENS, running
from tests.e2e.test_round_batch import CONFIG, connect, connect_errors, orders_of, reading, step

EVENTS = ("start_round", "round.start", "round.result", "settled", "delivery")


class Trader:
    """P1 or P2 of test_round_batch's script, answering `start_round` or `round.start` with
    one `round.submit`, and logging every /market event it hears in arrival order."""

    def __init__(self, sio: socketio.AsyncClient, pid: str) -> None:
        self.sio, self.pid = sio, pid
        self.log: list[tuple[str, Any]] = []
        self.replies: list[Any] = []
        for event in EVENTS:
            sio.on(event, self._handler(event), namespace="/market")

    def _handler(self, event: str) -> Any:
        async def handle(data: Any) -> None:
            self.log.append((event, data))
            if event in ("start_round", "round.start"):
                meter = {"time_interval": data["current_round"], **reading(self.pid, data["current_round"][0])}
                orders = orders_of(self.pid, data)
                payload = {"meter": meter, **({"orders": orders} if orders else {})}
                self.replies.append(await self.sio.call("round.submit", payload, namespace="/market"))

        return handle

    def private(self) -> list[tuple[str, int, Any]]:
        """Every private payload heard, by number: (kind, seq, payload). Numbers only grow
        from one message to the next (checked); a message lists settled, then delivery."""
        out: list[tuple[str, int, Any]] = []
        for event, data in self.log:
            if event in ("round.start", "round.result"):
                these = [("settled", p["seq"], p) for p in data["settled"]]
                these += [("delivery", p["seq"], p) for p in data["delivery"]]
                assert not out or not these or min(s for _, s, _ in these) > out[-1][1]
                out += sorted(these, key=lambda x: x[1])
        return out


async def scripted(ledger_url: str, config: MarketConfig, round_start: bool, times: tuple[int, ...]) -> Trader:
    async with running(config, ledger_url) as (url, _server):
        ctl = await connect(url, "CTL", "/simulation")
        auth = {"combined": True, **({"round_start": True} if round_start else {})}
        p1 = Trader(await connect(url, "P1", **auth), "P1")
        p2 = Trader(await connect(url, "P2", combined=True), "P2")
        for t in times:
            await step(ctl, t)
        await asyncio.sleep(CARRY_SECONDS + 0.3)  # the last step's results, carried or not
        assert all(r["ok"] for r in p1.replies + p2.replies), p1.replies + p2.replies
        for c in (p1.sio, p2.sio, ctl):
            await c.disconnect()
    return p1


async def test_round_start_carries_what_round_result_would_and_the_same_ledger(tmp_path: Path) -> None:
    times = (600, 660, 720, 780)
    one, other = f"sqlite:///{tmp_path}/result.db", f"sqlite:///{tmp_path}/start.db"
    combined = await scripted(one, CONFIG, False, times)
    starting = await scripted(other, CONFIG, True, times)
    # round.result after every step; round.start instead of every start_round, the last
    # step's results sent as round.result once no step followed.
    assert [e for e, _ in combined.log] == ["start_round", "round.result"] * 4
    assert [e for e, _ in starting.log] == ["round.start"] * 4 + ["round.result"]
    first = starting.log[0][1]
    assert first["settled"] == [] and first["delivery"] == []
    assert {k: v for k, v in first.items() if k not in ("settled", "delivery")} == combined.log[0][1]
    # The same payloads, in the same order, with the same numbers; each a step later.
    assert starting.private() == combined.private()
    assert [seq for _, seq, _ in starting.private()] == list(range(1, 6))
    assert [len(d["delivery"]) for _, d in starting.log] == [0, 1, 1, 1, 1]
    assert ledger_digest(one) == ledger_digest(other)


async def test_fills_of_the_slot_a_round_delivers_ride_in_its_round_start(tmp_path: Path) -> None:
    config = MarketConfig(duration=60, close_steps=1, round_timeout=1.0)  # a slot clears when it is delivered
    times = (600, 660, 720)
    combined = await scripted(f"sqlite:///{tmp_path}/a.db", config, False, times)
    starting = await scripted(f"sqlite:///{tmp_path}/b.db", config, True, times)
    # P1's ask of [720, 780] clears at step 720, which delivers it: a combined session gets
    # the fill in a round.result just before that start_round; round.start carries it.
    assert [e for e, _ in combined.log] == ["start_round", "round.result"] * 2 + [
        "round.result",
        "start_round",
        "round.result",
    ]
    assert [e for e, _ in starting.log] == ["round.start"] * 3 + ["round.result"]
    third = starting.log[2][1]
    assert [s["time_delivery"] for s in third["settled"]] == [[720, 780]]
    assert [d["time_delivery"] for d in third["delivery"]] == [[660, 720]]  # the step before's
    assert starting.private() == combined.private()


async def test_results_go_as_round_result_when_no_step_follows(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        p1 = Trader(await connect(url, "P1", combined=True, round_start=True), "P1")
        await step(ctl, 600)
        assert [e for e, _ in p1.log] == ["round.start"]
        assert "P1" in server._held  # its delivery of [600, 660], waiting for the next step
        await asyncio.sleep(CARRY_SECONDS + 0.2)
        assert [e for e, _ in p1.log] == ["round.start", "round.result"]
        assert [d["time_delivery"] for d in p1.log[1][1]["delivery"]] == [[600, 660]]
        assert not server._held and server._carry is None
        await step(ctl, 660)  # nothing carried twice
        await asyncio.sleep(0.1)
        late = p1.log[2][1]
        assert p1.log[2][0] == "round.start" and late["settled"] == [] and late["delivery"] == []
        for c in (p1.sio, ctl):
            await c.disconnect()


async def test_a_v1_session_beside_round_start_sessions_gets_start_round(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        ctl = await connect(url, "CTL", "/simulation")
        p1 = Trader(await connect(url, "P1", combined=True, round_start=True), "P1")
        v1 = await connect(url, "P2")
        heard: list[str] = []
        for event in EVENTS:
            v1.on(event, lambda _data, event=event: heard.append(event), namespace="/market")
        await step(ctl, 600)
        await step(ctl, 660)
        await asyncio.sleep(CARRY_SECONDS + 0.2)
        assert heard == ["start_round", "start_round"]  # P2 sends nothing: no delivery rows
        assert [e for e, _ in p1.log] == ["round.start", "round.start", "round.result"]
        for c in (p1.sio, v1, ctl):
            await c.disconnect()


async def test_participant_client_with_round_start_gets_every_result(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        spec = decode_spec({"id": "P1", "load": {"kind": "synthetic"}, "trader": {"kind": "none"}})
        pc = ParticipantClient(Prosumer(spec, 1), combined=True, round_start=True)
        await pc.connect(url, "P1", TOKENS["P1"])
        assert server.market_ns.starting == {server.sessions["/market"].sid_of["P1"]}
        for t in (600, 660, 720):
            await step(ctl, t)
        assert pc.stats.delivered == 2  # the last one still held
        await asyncio.sleep(CARRY_SECONDS + 0.2)
        assert pc.stats.delivered == 3 and pc.stats.meters == 3 and pc.stats.errors == 0
        assert pc.last_seq == 3
        await pc.disconnect()
        await ctl.disconnect()


async def test_bad_round_start_flags_are_refused(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        for auth, message in (
            ({"combined": True, "round_start": "yes"}, "invalid: auth.round_start must be true or false"),
            ({"round_start": True}, "invalid: auth.round_start needs auth.combined = true"),
        ):
            errors = await connect_errors(url, "P1", **auth)
            assert errors and errors[0].get("message") == message, errors
        assert server.market_ns.starting == set() and server.market_ns.combined == set()
    try:
        ParticipantClient(Prosumer(decode_spec({"id": "P1", "load": {"kind": "synthetic"}}), 1), round_start=True)
    except ValueError as err:
        assert "combined" in str(err)
    else:
        raise AssertionError("round_start without combined was accepted")


async def test_a_session_that_drops_round_start_between_steps_gets_the_held_results_first(
    ledger_url: str, monkeypatch: Any
) -> None:
    import market.server.app as app

    monkeypatch.setattr(app, "CARRY_SECONDS", 30.0)  # the next step comes first, whatever the machine
    config = MarketConfig(duration=60, close_steps=3, round_timeout=1.0)  # fills two rounds ahead
    async with running(config, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        first = Trader(await connect(url, "P1", combined=True, round_start=True), "P1")
        p2 = await connect(url, "P2")
        await step(ctl, 600)  # next_settle is [780, 840]
        ask = {"quantity": 300, "price": 0.1, "time_delivery": [780, 840], "source": "solar"}
        assert (await first.sio.call("ask", ask, namespace="/market"))["ok"]
        assert (
            await p2.call("bid", {"quantity": 300, "price": 0.3, "time_delivery": [780, 840]}, namespace="/market")
        )["ok"]
        await step(ctl, 660)  # clears [780, 840]: P1's fill, held with its delivery of [660, 720]
        assert [e for e, _ in server._held["P1"]] == ["settled", "delivery"]
        await first.sio.disconnect()
        for _ in range(50):
            if "P1" not in server.sessions["/market"].sid_of:
                break
            await asyncio.sleep(0.02)
        again = Trader(await connect(url, "P1", combined=True), "P1")  # combined only now
        await step(ctl, 720)
        await asyncio.sleep(0.1)
        # Both held payloads before the round starts (the fill is of a slot two rounds ahead:
        # not one that `due` would send early), then the round's own round.result.
        assert [e for e, _ in again.log] == ["round.result", "start_round", "round.result"], again.log
        held, late = again.log[0][1], again.log[2][1]
        assert [f["time_delivery"] for f in held["settled"]] == [[780, 840]]
        assert [d["time_delivery"] for d in held["delivery"]] == [[660, 720]]
        assert [d["time_delivery"] for d in late["delivery"]] == [[720, 780]]
        assert [kind for kind, _, _ in again.private()] == ["settled", "delivery", "delivery"]
        assert server._carry is None and not server._held
        for c in (again.sio, p2, ctl):
            await c.disconnect()
