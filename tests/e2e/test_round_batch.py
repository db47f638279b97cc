"""The one-event round (docs/protocol.md, *One event per round*): `round.submit` carries a
participant's orders and reading, `auth.combined` turns its `settled` and `delivery` into
one `round.result` per round, and v1 clients on the same server see no difference."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import socketio

from ledger import ledger_digest, read_rows
from market.core.engine import MarketConfig
from market.core.protocol import MAX_ORDERS
from participants.client import ParticipantClient
from participants.prosumer import Prosumer
from participants.spec import decode_spec
from tests.e2e.conftest import TOKENS, running

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)
SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "community.toml"
LEDGER_TABLES = ("transactions", "settlements", "meters", "entries", "cancels")


async def connect(url: str, pid: str, namespace: str = "/market", **auth: Any) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        url,
        namespaces=[namespace],
        auth={"id": pid, "token": TOKENS[pid], **auth},
        transports=["websocket"],
        wait_timeout=5,
    )
    return sio


async def step(ctl: socketio.AsyncClient, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    return reply["round"]


class Heard:
    """Every `/market` event one client receives, in arrival order (create it after the
    client's own handlers: it logs, then calls them)."""

    def __init__(self, sio: socketio.AsyncClient) -> None:
        self.log: list[tuple[str, Any]] = []
        for event in ("start_round", "settled", "delivery", "round.result"):
            then = sio.handlers.get("/market", {}).get(event)
            sio.on(event, self._collector(event, then), namespace="/market")

    def _collector(self, event: str, then: Any) -> Any:
        async def collect(data: Any) -> None:
            self.log.append((event, data))
            if then is not None:
                await then(data)

        return collect

    def of(self, event: str) -> list[Any]:
        return [d for e, d in self.log if e == event]


def reading(pid: str, start: int) -> dict[str, Any]:
    """P1 sells solar, P2 buys; both import a little every slot (so each has a delivery)."""
    if pid == "P1":
        return {"generation": {"solar": 600}, "consumption": {"other": {"solar": 100, "external": 10}}}
    return {"consumption": {"other": {"external": 500 if start == 720 else 20}}}


def orders_of(pid: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
    """In the round whose next_settle is [720, 780]: P1 asks 500 Wh, P2 bids 400 (and 10 more)."""
    if msg["next_settle"] != [720, 780]:
        return []
    if pid == "P1":
        return [{"side": "ask", "quantity": 500, "price": 0.10, "time_delivery": [720, 780], "source": "solar"}]
    return [
        {"side": "bid", "id": "b1", "quantity": 400, "price": 0.20, "time_delivery": [720, 780]},
        {"side": "bid", "id": "b2", "quantity": 10, "price": 0.05, "time_delivery": [720, 780]},
    ]


def trade_script(sio: socketio.AsyncClient, pid: str, combined: bool, replies: list[Any]) -> None:
    """On each start_round: the orders and the reading, as `orders` + `meter` or one `round.submit`."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        meter = {"time_interval": msg["current_round"], **reading(pid, msg["current_round"][0])}
        orders = orders_of(pid, msg)
        if combined:
            payload = {"meter": meter, **({"orders": orders} if orders else {})}
            replies.append(await sio.call("round.submit", payload, namespace="/market"))
            return
        if orders:
            replies.append(await sio.call("orders", {"orders": orders}, namespace="/market"))
        replies.append(await sio.call("meter", meter, namespace="/market"))

    sio.on("start_round", on_start_round, namespace="/market")


async def scripted_run(ledger_url: str, combined: bool) -> list[Any]:
    async with running(CONFIG, ledger_url) as (url, _server):
        ctl = await connect(url, "CTL", "/simulation")
        p1, p2 = await connect(url, "P1"), await connect(url, "P2")
        replies: list[Any] = []
        trade_script(p1, "P1", combined, replies)
        trade_script(p2, "P2", combined, replies)
        for t in (600, 660, 720, 780):
            await step(ctl, t)
        for c in (p1, p2, ctl):
            await c.disconnect()
    return replies


async def test_round_submit_gives_the_ledger_rows_of_separate_events(tmp_path: Path) -> None:
    separate, one = f"sqlite:///{tmp_path}/separate.db", f"sqlite:///{tmp_path}/one.db"
    v1_replies = await scripted_run(separate, combined=False)
    replies = await scripted_run(one, combined=True)
    assert all(r["ok"] for r in v1_replies + replies), v1_replies + replies
    with_orders = [r for r in replies if r["results"]]
    assert len(with_orders) == 2 and all(r["meter"] == {"ok": True} for r in replies)
    assert sorted(len(r["results"]) for r in with_orders) == [1, 2]
    assert all(res["ok"] and res["entry"]["uuid"] for r in with_orders for res in r["results"])
    for table in LEDGER_TABLES:
        assert read_rows(one, table) == read_rows(separate, table), table
    assert ledger_digest(one) == ledger_digest(separate)
    assert [r["kind"] for r in read_rows(one, "transactions") if r["kind"] == "p2p"] == ["p2p"]


async def test_a_bad_order_or_reading_refuses_the_whole_event_and_changes_nothing(ledger_url: str) -> None:
    config = MarketConfig(duration=60, close_steps=2, round_timeout=5.0)
    async with running(config, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        p1, p2, dso = await connect(url, "P1"), await connect(url, "P2"), await connect(url, "DSO")
        market = server.market
        order = {"side": "bid", "quantity": 40, "price": 0.3, "time_delivery": [720, 780]}
        ask = {"side": "ask", "id": "a1", "quantity": 30, "price": 0.1, "time_delivery": [780, 840], "source": "solar"}
        seen: list[tuple[str, Any, int, list[str], int]] = []

        async def submit(label: str, payload: Any, sio: socketio.AsyncClient = p1) -> None:
            reply = await sio.call("round.submit", payload, namespace="/market")
            t = market.times.time if market.times else 0
            seen.append((label, reply, len(market.book), market.metered(t), len(market.journal)))

        async def probe(msg: dict[str, Any]) -> None:
            # Sent while the round waits for readings (P2's comes last, so the step waits).
            t, meter = msg["time"], {"time_interval": msg["current_round"], "consumption": {"other": {"external": 40}}}
            if t == 600:
                await submit("bad order", {"orders": [order, {**order, "quantity": -1}], "meter": meter})
                await submit("bad source", {"orders": [order], "meter": {**meter, "generation": {"coal": 5}}})
                await submit("closed", {"orders": [order], "meter": {"time_interval": [540, 600]}})
                await submit("schema", {"orders": [order], "meter": {"time_interval": [600, "660"]}})
                await submit("unknown field", {"orders": [order], "reading": meter})
                await submit("too large", {"orders": [order] * (MAX_ORDERS + 1), "meter": meter})
                await submit("forbidden", {"meter": meter}, dso)
                await submit("good", {"orders": [order, {**order, "price": 99.0}], "meter": meter})
            else:
                await submit("first", {"orders": [ask], "meter": meter})
                await submit("again", {"orders": [ask], "meter": meter})
                conflict = {**meter, "consumption": {"other": {"external": 41}}}
                await submit("conflict", {"orders": [{**ask, "id": "a2"}], "meter": conflict})
                await submit("nothing", {})
            await p2.call("meter", meter, namespace="/market")

        p1.on("start_round", probe, namespace="/market")
        await step(ctl, 600)
        await step(ctl, 660)
        for c in (p1, p2, dso, ctl):
            await c.disconnect()

    by = {label: (reply, book, metered, journal) for label, reply, book, metered, journal in seen}
    for label in ("bad order", "bad source", "closed", "schema", "unknown field", "too large", "forbidden"):
        reply, book, metered, journal = by[label]
        assert reply["ok"] is False, (label, reply)
        assert (book, metered, journal) == (0, [], 0), (label, book, metered, journal)  # nothing changed
    error = {label: by[label][0]["error"] for label in by if not by[label][0]["ok"]}
    assert error["bad order"]["code"] == "invalid" and error["bad order"]["part"] == "orders"
    assert "$.orders[1].quantity" in error["bad order"]["message"]
    assert (error["bad source"]["code"], error["bad source"]["part"]) == ("invalid", "meter")
    assert error["bad source"]["message"].startswith("meter: unknown source 'coal'")
    assert (error["closed"]["code"], error["closed"]["part"]) == ("closed", "meter")
    assert error["schema"]["part"] == "meter" and "$.meter.time_interval" in error["schema"]["message"]
    assert error["unknown field"]["code"] == "invalid" and "part" not in error["unknown field"]
    assert (error["too large"]["code"], error["too large"]["part"]) == ("too_large", "orders")
    assert error["forbidden"]["code"] == "forbidden"
    good, book, metered, _ = by["good"]
    assert good["ok"] is True and good["meter"] == {"ok": True}, good
    booked, out_of_bounds = good["results"]  # as in `orders`: each order on its own
    assert booked["ok"] and out_of_bounds["error"]["code"] == "invalid"
    assert book == 1 and metered == ["P1"]
    first, again = by["first"][0], by["again"][0]
    assert first["ok"] and again["results"][0]["duplicate"] is True, again
    assert again["meter"] == {"ok": True, "duplicate": True}
    conflict, book, _, _ = by["conflict"]
    assert (conflict["error"]["code"], conflict["error"]["part"]) == ("conflict", "meter"), conflict
    assert book == by["again"][1]  # its order came with a refused reading: not booked
    assert by["nothing"][0] == {"ok": True, "results": []}


async def test_round_submit_costs_a_token_per_order_and_one_for_the_reading(ledger_url: str) -> None:
    config = MarketConfig(duration=60, close_steps=2, round_timeout=5.0, rate_burst=3, rate_per_second=0.001)
    async with running(config, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        p1 = await connect(url, "P1")
        order = {"side": "bid", "quantity": 40, "price": 0.3, "time_delivery": [720, 780]}
        replies: list[Any] = []

        async def probe(msg: dict[str, Any]) -> None:
            meter = {"time_interval": msg["current_round"]}
            for orders in ([order] * 3, [order] * 2):  # 3 + 1 tokens: above the burst; 2 + 1: paid
                replies.append(await p1.call("round.submit", {"orders": orders, "meter": meter}, namespace="/market"))
                replies.append(len(server.market.book))

        p1.on("start_round", probe, namespace="/market")
        await step(ctl, 600)
        for c in (p1, ctl):
            await c.disconnect()
    costly, after_costly, paid, after_paid = replies
    assert costly["error"]["code"] == "rate_limited" and after_costly == 0, (costly, after_costly)
    assert paid["ok"] and paid["meter"] == {"ok": True} and after_paid == 2, (paid, after_paid)
    assert [m["participant_id"] for m in read_rows(ledger_url, "meters")] == ["P1"]  # the paid one only


async def test_a_combined_client_gets_one_round_result_per_round_and_v1_clients_the_events(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        ctl = await connect(url, "CTL", "/simulation")
        p1, p2 = await connect(url, "P1", combined=True), await connect(url, "P2")
        replies: list[Any] = []
        trade_script(p1, "P1", True, replies)
        trade_script(p2, "P2", False, replies)
        h1, h2 = Heard(p1), Heard(p2)
        for t in (600, 660, 720, 780):
            await step(ctl, t)
        await asyncio.sleep(0.2)
        assert all(r["ok"] for r in replies), replies
        # P1 (combined): no v1 private event, one round.result per step, in order before the
        # next start_round; each carries that round's fills and deliveries.
        assert h1.of("settled") == [] and h1.of("delivery") == []
        assert [e for e, _ in h1.log] == ["start_round", "round.result"] * 4
        results = h1.of("round.result")
        assert [[d["time_delivery"][0] for d in r["delivery"]] for r in results] == [[600], [660], [720], [780]]
        assert [len(r["settled"]) for r in results] == [0, 1, 0, 0]
        fill = results[1]["settled"][0]
        assert (fill["side"], fill["quantity"], fill["time_delivery"]) == ("ask", 400, [720, 780])
        kinds = {t["kind"] for t in results[2]["delivery"][0]["transactions"]}
        assert "p2p" in kinds
        seqs = [p["seq"] for r in results for p in r["settled"] + r["delivery"]]
        assert seqs == list(range(1, len(seqs) + 1))  # numbered as the v1 events would be
        # P2 (v1, same server): the separate events, settled before its round's start_round.
        assert h2.of("round.result") == []
        assert [e for e, _ in h2.log] == ["start_round", "delivery", "settled"] + ["start_round", "delivery"] * 3
        assert [d["time_delivery"][0] for d in h2.of("delivery")] == [600, 660, 720, 780]
        assert [s["id"] for s in h2.of("settled")] == ["b1"]
        for c in (p1, p2, ctl):
            await c.disconnect()


async def test_fills_of_the_slot_a_round_delivers_come_before_its_start_round(ledger_url: str) -> None:
    config = MarketConfig(duration=60, close_steps=1, round_timeout=1.0)  # a slot clears when it is delivered
    async with running(config, ledger_url) as (url, _server):
        ctl = await connect(url, "CTL", "/simulation")
        p1, p2 = await connect(url, "P1", combined=True), await connect(url, "P2")
        trade_script(p2, "P2", False, [])  # reads 20 Wh imported: P1's undelivered sale is short
        h1 = Heard(p1)
        await step(ctl, 600)  # next_settle is [660, 720]
        mark = len(h1.log)
        ask = {"side": "ask", "quantity": 50, "price": 0.1, "time_delivery": [660, 720], "source": "solar"}
        assert (await p1.call("round.submit", {"orders": [ask]}, namespace="/market"))["ok"]
        assert (await p2.call("bid", {"quantity": 50, "price": 0.3, "time_delivery": [660, 720]}, namespace="/market"))[
            "ok"
        ]
        await step(ctl, 660)  # clears [660, 720] and delivers it in the same round
        await asyncio.sleep(0.2)
        events = [e for e, _ in h1.log[mark:]]
        assert events == ["round.result", "start_round", "round.result"], events
        early, late = h1.log[mark][1], h1.log[mark + 2][1]
        assert [s["time_delivery"] for s in early["settled"]] == [[660, 720]] and early["delivery"] == []
        assert late["settled"] == [] and [d["time_delivery"] for d in late["delivery"]] == [[660, 720]]
        for c in (p1, p2, ctl):
            await c.disconnect()


async def test_resume_after_a_disconnect_returns_what_a_combined_client_missed(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        p1, p2 = await connect(url, "P1", combined=True), await connect(url, "P2")
        trade_script(p1, "P1", True, [])
        trade_script(p2, "P2", False, [])
        h1 = Heard(p1)
        await step(ctl, 600)
        await step(ctl, 660)  # P1's fill of [720, 780] is cleared
        await asyncio.sleep(0.1)
        seen = [p["seq"] for r in h1.of("round.result") for p in r["settled"] + r["delivery"]]
        assert seen == [1, 2, 3]
        await p1.disconnect()  # away while its fill is delivered
        for _ in range(50):
            if "P1" not in server.sessions["/market"].sid_of:
                break
            await asyncio.sleep(0.02)
        await step(ctl, 720)
        back = await connect(url, "P1", combined=True)
        replay = await back.call("resume", {"since": seen[-1]}, namespace="/market")
        assert replay["ok"] and replay["more"] is False, replay
        assert [(e["event"], e["data"]["seq"]) for e in replay["events"]] == [("delivery", 4)]
        assert replay["events"][0]["data"]["time_delivery"] == [720, 780]
        assert {t["kind"] for t in replay["events"][0]["data"]["transactions"]} >= {"financial"}
        full = await back.call("resume", {"since": 0}, namespace="/market")
        assert [e["data"]["seq"] for e in full["events"]] == [1, 2, 3, 4]
        assert [e["event"] for e in full["events"]] == ["delivery", "settled", "delivery", "delivery"]
        trade_script(back, "P1", True, [])
        h_back = Heard(back)
        await step(ctl, 780)  # live again: the next round.result continues the numbering
        await asyncio.sleep(0.1)
        assert [p["seq"] for r in h_back.of("round.result") for p in r["delivery"]] == [5]
        for c in (back, p2, ctl):
            await c.disconnect()


async def test_participant_client_in_combined_mode_trades_and_resumes(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        spec = decode_spec({"id": "P1", "load": {"kind": "synthetic"}, "trader": {"kind": "none"}})
        pc = ParticipantClient(Prosumer(spec, 1), combined=True)
        sent: list[str] = []
        original = pc._emit

        async def spy(event: str, data: Any) -> asyncio.Future[Any]:
            sent.append(event)
            return await original(event, data)

        pc._emit = spy  # type: ignore[method-assign]
        await pc.connect(url, "P1", TOKENS["P1"])
        p2 = await connect(url, "P2")
        trade_script(p2, "P2", False, [])
        await step(ctl, 600)
        ask = {"quantity": 400, "price": 0.1, "time_delivery": [720, 780], "source": "solar"}
        assert (await pc.sio.call("ask", ask, namespace="/market"))["ok"]
        await step(ctl, 660)
        await asyncio.sleep(0.1)
        assert pc.stats.fills == 1 and pc.stats.delivered == 2 and pc.last_seq == 3
        await pc.sio.eio.ws.close()  # the network drops; it misses the delivery of [720, 780]
        for _ in range(50):
            if "P1" not in server.sessions["/market"].sid_of:
                break
            await asyncio.sleep(0.02)
        await step(ctl, 720)
        for _ in range(100):
            if pc.last_seq > 3:
                break
            await asyncio.sleep(0.05)
        assert pc.last_seq == 4 and pc.stats.delivered == 3  # reconnected and resumed
        await step(ctl, 780)
        await asyncio.sleep(0.1)
        assert pc.last_seq == 5 and pc.stats.delivered == 4 and pc.stats.errors == 0
        assert set(sent) == {"round.submit", "resume"} and pc.stats.meters >= 3
        await pc.disconnect()
        for c in (p2, ctl):
            await c.disconnect()


async def test_a_refused_reading_does_not_lose_the_client_s_orders(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await connect(url, "CTL", "/simulation")
        spec = decode_spec({"id": "P1", "load": {"kind": "synthetic"}, "trader": {"kind": "none"}})
        pc = ParticipantClient(Prosumer(spec, 1), combined=True)
        await pc.connect(url, "P1", TOKENS["P1"])
        await step(ctl, 600)
        # A reading of a slot already processed (`closed`, as a late one in rt) with an order.
        orders = [{"side": "bid", "quantity": 10, "price": 0.2, "time_delivery": [720, 780]}]
        errors, book = pc.stats.errors, len(server.market.book)
        await pc._submit({"time_interval": [600, 660]}, orders)
        assert pc.stats.errors == errors + 1 and pc.stats.accepted == 1  # the reading; the order
        assert len(server.market.book) == book + 1  # sent again as `orders`
        assert [e for e, _ in list(pc.replies)[-2:]] == ["meter", "orders"]
        await pc.disconnect()
        await ctl.disconnect()


async def connect_errors(url: str, pid: str, **auth: Any) -> list[Any]:
    """The connect errors /market answers a login of `pid` with these `auth` fields."""
    sio = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    sio.on("connect_error", errors.append, namespace="/market")
    with contextlib.suppress(socketio.exceptions.ConnectionError):
        await sio.connect(
            url,
            namespaces=["/market"],
            transports=["websocket"],
            wait_timeout=5,
            auth={"id": pid, "token": TOKENS[pid], **auth},
        )
    await sio.disconnect()
    return errors


async def test_a_bad_combined_flag_is_refused_and_v1_auth_still_works(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        errors = await connect_errors(url, "P1", combined="yes")
        assert errors and str(errors[0].get("message", "")).startswith("invalid: auth.combined")
        v1 = await connect(url, "P1")
        off = await connect(url, "P2", combined=False)
        assert server.market_ns.combined == set()
        for c in (v1, off):
            await c.disconnect()


async def test_microte_sim_gives_the_same_ledger_in_both_modes(tmp_path: Path) -> None:
    from controller.sim import run_sim

    digests = {}
    for combined in (False, True):
        url = f"sqlite:///{tmp_path}/{combined}.db"
        result = await run_sim(SCENARIO, ledger=url, participants=8, days=0.25, progress=False, combined=combined)
        assert result.summary.rounds == 24 and result.missing_total == 0
        digests[combined] = ledger_digest(url)
    assert digests[True] == digests[False]


async def test_rt_boundary_sends_one_round_result_and_v1_events_alongside(ledger_url: str) -> None:
    config = MarketConfig(mode="rt", duration=2, close_steps=1, meter_grace=0.4)
    async with running(config, ledger_url) as (url, _server):
        p1, p2 = await connect(url, "P1", combined=True), await connect(url, "P2")
        replies: list[Any] = []

        def rt_script(sio: socketio.AsyncClient, side: str, combined: bool, meter: dict[str, Any]) -> None:
            async def on_start_round(msg: dict[str, Any]) -> None:
                reading = {"time_interval": msg["last_round"], **meter}
                order = {"side": side, "quantity": 30, "price": 0.1 if side == "ask" else 0.3}
                order |= {"time_delivery": msg["next_settle"]} | ({"source": "solar"} if side == "ask" else {})
                if combined:
                    payload = {"orders": [order], "meter": reading}
                    replies.append(await sio.call("round.submit", payload, namespace="/market"))
                else:
                    replies.append(await sio.call("orders", {"orders": [order]}, namespace="/market"))
                    replies.append(await sio.call("meter", reading, namespace="/market"))

            sio.on("start_round", on_start_round, namespace="/market")

        rt_script(p1, "ask", True, {"generation": {"solar": 50}})
        rt_script(p2, "bid", False, {"consumption": {"other": {"external": 40}}})
        h1, h2 = Heard(p1), Heard(p2)
        await asyncio.sleep(7.5)
        await p1.disconnect()
        await p2.disconnect()
    assert h1.of("settled") == [] and h1.of("delivery") == []
    results = h1.of("round.result")
    rounds = len(h1.of("start_round"))
    assert rounds >= 3 and rounds - 2 <= len(results) <= rounds, (rounds, results)
    fills = [s for r in results for s in r["settled"]]
    deliveries = [d for r in results for d in r["delivery"]]
    assert fills and all(s["side"] == "ask" and s["quantity"] == 30 for s in fills)
    assert deliveries and any(t["kind"] == "p2p" for d in deliveries for t in d["transactions"])
    assert h2.of("round.result") == [] and h2.of("settled") and h2.of("delivery")
    p2p = [t for t in read_rows(ledger_url, "transactions") if t["kind"] == "p2p"]
    assert p2p and all((t["seller_id"], t["buyer_id"]) == ("P1", "P2") for t in p2p)
