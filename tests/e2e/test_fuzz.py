"""10,000 hypothesis-generated malformed payloads against a running server: each gets an
error reply, none changes state, and the market still trades correctly afterwards."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import socketio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ledger import read_rows
from market.core.engine import MarketConfig
from market.server.app import MarketServer
from tests.e2e.conftest import TOKENS, running

CODES = {"invalid", "unauthorized", "forbidden", "closed", "conflict", "not_found", "too_large", "rate_limited"}
SLOT = [720, 780]  # next_settle after the step at 600
BID = {"quantity": 100, "price": 0.1, "time_delivery": SLOT, "source": "solar"}
METER = {"time_interval": [600, 660], "generation": {"solar": 10}, "consumption": {"other": {"external": 5}}}

json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=20,
)
not_int = st.floats() | st.booleans() | st.text(max_size=5) | st.none() | st.lists(st.integers(), max_size=2)
bad_quantity = st.integers(max_value=0) | st.integers(min_value=10**9 + 1) | not_int
bad_price = (
    st.floats().filter(lambda x: math.isnan(x) or not 0 <= x <= 10)
    | st.booleans()
    | st.text(max_size=5)
    | st.none()
    | st.integers().filter(lambda x: not 0 <= x <= 10)
)


def _open_slot(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and all(type(x) is int for x in v)
        and v[0] % 60 == 0
        and v[1] == v[0] + 60
        and 720 <= v[0] <= 720 + 96 * 60
    )


bad_interval = (st.lists(st.integers(), min_size=0, max_size=3) | json_junk).filter(lambda v: not _open_slot(v))
bad_source = (
    st.sampled_from(["nuclear", "SOLAR", "", "x" * 40, "grid"]) | st.integers() | st.lists(st.text(), max_size=2)
)
bad_wh = st.integers(max_value=-1) | st.integers(min_value=10**9 + 1) | not_int


def replace(base: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return values.map(lambda v: {**base, key: v})


entry_payload = st.one_of(
    json_junk,
    replace(BID, "quantity", bad_quantity),
    replace(BID, "price", bad_price),
    replace(BID, "time_delivery", bad_interval),
    replace(BID, "source", bad_source),
    replace(BID, "id", st.integers() | st.text(min_size=65, max_size=80) | st.just("")),
    st.tuples(st.text(max_size=8).filter(lambda k: k not in BID and k != "id"), json_junk).map(
        lambda kv: {**BID, kv[0]: kv[1]}
    ),
)
meter_payload = st.one_of(
    json_junk,
    replace(METER, "time_interval", bad_interval.filter(lambda v: v != [600, 660])),
    bad_wh.map(lambda v: {**METER, "generation": {"solar": v}}),
    bad_source.filter(lambda s: s != "").map(lambda s: {**METER, "generation": {str(s): 5}}),
    st.just({**METER, "consumption": {"bess": {"external": 5}}}),
    st.just({**METER, "generation": {f"s{i}": 1 for i in range(17)}}),
    st.tuples(st.text(max_size=8).filter(lambda k: k not in METER), json_junk).map(lambda kv: {**METER, kv[0]: kv[1]}),
)
call = st.one_of(
    st.tuples(st.sampled_from(["bid", "ask"]), entry_payload),
    st.tuples(
        st.just("orders"), entry_payload.map(lambda p: {"orders": [{"side": "bid", **p}]} if isinstance(p, dict) else p)
    ),
    st.tuples(st.just("cancel"), json_junk | st.text(max_size=10).map(lambda u: {"uuid": u or "x"})),
    st.tuples(st.just("meter"), meter_payload),
    st.tuples(st.sampled_from(["hack", "step", "start_round", "settled", "reset"]), json_junk),
)


class ThreadedServer:
    """The real server on its own event loop, so hypothesis can drive a sync client."""

    def __init__(self, ledger_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.url = ""
        self.server: MarketServer | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(ledger_url),))

    async def _main(self, ledger_url: str) -> None:
        self.stop = asyncio.Event()
        config = MarketConfig(duration=60, round_timeout=1.0, rate_per_second=1e6, rate_burst=10**6)
        async with running(config, ledger_url) as (url, server):
            self.url, self.server = url, server
            self.ready.set()
            await self.stop.wait()
        # engine.io leaves its ping and service tasks behind; end them before the loop closes.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def connect(url: str, pid: str, namespace: str = "/market") -> socketio.SimpleClient:
    c = socketio.SimpleClient()
    c.connect(url, namespace=namespace, auth={"id": pid, "token": TOKENS[pid]}, transports=["websocket"])
    return c


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedServer, dict[str, socketio.SimpleClient]]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/ledger.db"
    with ThreadedServer(url) as srv:
        clients = {p: connect(srv.url, p) for p in ("P1", "P2")} | {"CTL": connect(srv.url, "CTL", "/simulation")}
        # Open the market (time 600) without waiting for readings: nobody meters in this test.
        assert clients["CTL"].call("step", {"time": 600}, timeout=10)["ok"]
        yield srv, clients
        for c in clients.values():
            c.disconnect()


SENT = [0]


@settings(
    max_examples=250, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck), derandomize=True
)
@given(batch=st.lists(call, min_size=50, max_size=50))
def test_malformed_payloads_get_errors_and_change_nothing(live: Any, batch: list[tuple[str, Any]]) -> None:
    srv, clients = live
    for event, payload in batch:
        reply = clients["P1"].call(event, payload, timeout=10)
        assert isinstance(reply, dict), (event, payload, reply)
        # A well-formed batch is accepted as a batch; each of its orders is then refused on its own.
        errors = [r["error"] for r in reply["results"]] if event == "orders" and reply.get("ok") else [reply["error"]]
        assert errors and all(e["code"] in CODES and isinstance(e["message"], str) for e in errors), (payload, reply)
    SENT[0] += len(batch)
    assert len(srv.server.market.book) == 0
    assert srv.server.market.metered(600) == []


def test_oversized_batch_is_too_large(live: Any) -> None:
    _srv, clients = live
    reply = clients["P1"].call("orders", {"orders": [dict(BID, side="bid")] * 1001}, timeout=10)
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"


def test_after_the_fuzz_the_market_still_trades(live: Any) -> None:
    srv, clients = live
    assert SENT[0] >= 10_000
    ask = clients["P1"].call("ask", {**BID, "price": 0.1}, timeout=10)
    bid = clients["P2"].call("bid", {"quantity": 60, "price": 0.3, "time_delivery": SLOT}, timeout=10)
    assert ask["ok"] and bid["ok"]
    r = clients["CTL"].call("step", {"time": 660}, timeout=10)
    assert r["ok"] and r["round"]["trades"] == 1
    url = srv.server.sink.url  # type: ignore[attr-defined]
    fills = read_rows(url, "settlements")
    assert [(f["seller_id"], f["buyer_id"], f["quantity"]) for f in fills] == [("P1", "P2", 60)]
