"""`GET /healthz` and `GET /metrics` (market/server/observe.py, docs/operations.md) on a
real server: 200 with the fields after a round, 503 while the ledger fails or the round
loop's heartbeat is stale, a scrape that parses, and neither route waits for the round lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ledger import open_sink
from market.core.engine import MarketConfig
from market.server import observe
from market.server.app import MarketServer
from tests.e2e.conftest import FlakySink, client, registry

RT = MarketConfig(mode="rt", duration=2, meter_grace=0.2)
FIELDS = {
    "status",
    "mode",
    "round",
    "last_slot",
    "lag_seconds",
    "round_loop",
    "heartbeat_age_seconds",
    "ledger",
    "ledger_queue",
}
METRICS = {
    "microte_rounds_processed_total",
    "microte_slots_caught_up_total",
    "microte_round_lag_seconds",
    "microte_last_processed_slot",
    "microte_round_loop_alive",
    "microte_heartbeat_age_seconds",
    "microte_ledger_ok",
    "microte_ledger_write_failures_total",
    "microte_ledger_queue_depth",
    "microte_ledger_commits_total",
    "microte_ledger_last_commit_duration_seconds",
    "microte_participants_connected",
    "microte_connections",
    "microte_connections_pending",
    "microte_connections_refused_total",
    "microte_connections_closed_unauthenticated_total",
    "microte_ack_latency_seconds_bucket",
    "microte_ack_latency_seconds_count",
    "microte_ack_latency_seconds_sum",
    "microte_refused_total",
}


@asynccontextmanager
async def observed(server: MarketServer) -> AsyncIterator[tuple[str, observe.Metrics, aiohttp.ClientSession]]:
    """Serve `server` with the observe routes on an ephemeral port: (url, metrics, http)."""
    app = server.app()
    metrics = observe.attach(app, server)  # the routes are added before the runner starts
    assert observe.attach(app, server) is metrics  # idempotent (app.py may attach already)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            yield f"http://127.0.0.1:{port}", metrics, http
    finally:
        await runner.cleanup()


async def healthz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{url}/healthz") as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list[Any]]:
    """Sample name -> its samples, parsed as Prometheus does."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    (match,) = [s for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(match.value)


async def until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def rt_loop_task(server: MarketServer) -> asyncio.Task[None]:
    (task,) = [t for t in server._tasks if t.get_coro().__qualname__.endswith("_rt_loop")]  # type: ignore[union-attr]
    return task


async def test_healthz_is_200_with_its_fields_after_a_round(ledger_url: str) -> None:
    server = MarketServer(RT, registry(), open_sink(ledger_url))
    async with observed(server) as (url, _metrics, http):
        await until(lambda: server.last_processed() is not None, 3 * RT.duration + 2)
        status, body = await healthz(http, url)
        assert status == 200, body
        assert set(body) == FIELDS, body
        last = server.last_processed()
        assert last is not None and server.market.times is not None
        assert body["status"] == "ok" and body["mode"] == "rt"
        assert body["round"] == server.market.times.time
        assert body["last_slot"] == last.current_round_start
        assert 0 <= body["lag_seconds"] <= RT.meter_grace + 1.0, body  # on schedule
        assert body["round_loop"] == "alive" and body["heartbeat_age_seconds"] < RT.duration + 0.5
        assert body["ledger"] == "ok" and body["ledger_queue"] == 0


async def test_metrics_parse_and_name_every_metric(ledger_url: str) -> None:
    server = MarketServer(RT, registry(), open_sink(ledger_url))
    async with observed(server) as (url, metrics, http):
        p1 = await client(url, "P1")
        # Stored, not only processed: the counter moves once the slot's records are written.
        await until(lambda: server.rounds_processed >= 1, 3 * RT.duration + 2)
        metrics.observe_ack(0.002)
        metrics.observe_ack(0.2)
        metrics.refused("closed")
        samples = await scrape(http, url)
        assert not METRICS - set(samples), METRICS - set(samples)
        assert value(samples, "microte_rounds_processed_total") >= 1
        assert value(samples, "microte_round_loop_alive") == 1 and value(samples, "microte_ledger_ok") == 1
        last = server.last_processed()
        assert last is not None and value(samples, "microte_last_processed_slot") == last.current_round_start
        assert value(samples, "microte_participants_connected", namespace="/market") == 1
        assert value(samples, "microte_participants_connected", namespace="/grid") == 0
        assert {s.labels["namespace"] for s in samples["microte_participants_connected"]} == set(server.sessions)
        assert value(samples, "microte_connections") == 1 and value(samples, "microte_connections_pending") == 0
        assert value(samples, "microte_ack_latency_seconds_count") == 2
        assert value(samples, "microte_ack_latency_seconds_bucket", le="0.0025") == 1
        assert value(samples, "microte_refused_total", code="closed") == 1
        assert value(samples, "microte_refused_total", code="invalid") == 0  # every code, from the start
        assert value(samples, "microte_ledger_queue_depth") == 0
        await p1.disconnect()


async def test_healthz_is_503_while_the_ledger_fails(ledger_url: str) -> None:
    sink = FlakySink(ledger_url)
    server = MarketServer(RT, registry(), sink)
    async with observed(server) as (url, _metrics, http):
        p1 = await client(url, "P1")
        slot = (int(time.time()) // RT.duration + 10) * RT.duration
        bid = {"id": "b1", "quantity": 10, "price": 0.2, "time_delivery": [slot, slot + RT.duration]}
        # An acknowledged action whose write fails (`persist`, the group commit).
        sink.failing = True
        refused = await p1.call("bid", bid, namespace="/market")
        assert refused["error"]["code"] == "unavailable", refused
        status, body = await healthz(http, url)
        assert status == 503 and body["status"] == "unavailable" and body["ledger"] == "failing", body
        assert body["round_loop"] == "alive", body
        samples = await scrape(http, url)
        assert value(samples, "microte_ledger_ok") == 0
        assert value(samples, "microte_ledger_write_failures_total") >= 1
        sink.failing = False
        assert (await p1.call("bid", bid, namespace="/market"))["ok"]
        status, body = await healthz(http, url)
        assert status == 200 and body["ledger"] == "ok", body
        # A round the ledger refuses (`_store`): 503 until a later write succeeds.
        s: Any = server
        sink.failing = True
        await until(lambda: not s.ledger_ok, 3 * RT.duration + 2)
        status, body = await healthz(http, url)
        assert status == 503 and body["ledger"] == "failing", body
        sink.failing = False
        await until(lambda: s.ledger_ok, 3 * RT.duration + 2)
        status, body = await healthz(http, url)
        assert status == 200, body
        await p1.disconnect()


async def test_healthz_is_503_when_the_heartbeat_is_stale(ledger_url: str) -> None:
    server = MarketServer(RT, registry(), open_sink(ledger_url))
    async with observed(server) as (url, _metrics, http):
        status, body = await healthz(http, url)
        assert status == 200 and body["round_loop"] == "alive", body
        loop = rt_loop_task(server)
        loop.cancel()  # the round loop dies: nothing sets the heartbeat any more
        await asyncio.gather(loop, return_exceptions=True)
        limit = 2 * RT.duration + RT.meter_grace
        s: Any = server
        s.heartbeat = time.monotonic() - limit - 0.1  # its last boundary, more than 2 durations + grace ago
        status, body = await healthz(http, url)
        assert status == 503 and body["status"] == "unavailable" and body["round_loop"] == "dead", body
        assert body["heartbeat_age_seconds"] > limit and body["ledger"] == "ok", body
        samples = await scrape(http, url)
        assert value(samples, "microte_round_loop_alive") == 0
        assert value(samples, "microte_heartbeat_age_seconds") > limit
        s.heartbeat = time.monotonic() - limit + 1.0  # within the limit: alive
        status, body = await healthz(http, url)
        assert status == 200 and body["round_loop"] == "alive", body


async def test_routes_do_not_wait_for_the_round_lock(ledger_url: str) -> None:
    server = MarketServer(RT, registry(), open_sink(ledger_url))
    async with observed(server) as (url, _metrics, http):
        async with server._round_lock:  # a round being processed or stored, for as long as it takes
            t0 = time.perf_counter()
            status, _ = await asyncio.wait_for(healthz(http, url), 1.0)
            samples = await asyncio.wait_for(scrape(http, url), 1.0)
            assert time.perf_counter() - t0 < 1.0
        assert status == 200 and "microte_rounds_processed_total" in samples


async def test_sim_health_follows_the_market_clock(ledger_url: str) -> None:
    server = MarketServer(MarketConfig(mode="sim", duration=60), registry(), open_sink(ledger_url))
    async with observed(server) as (url, _metrics, http):
        status, body = await healthz(http, url)
        assert status == 200 and body["last_slot"] is None and body["lag_seconds"] is None, body
        assert body["round_loop"] == "alive" and body["heartbeat_age_seconds"] is None, body  # no loop in sim
        await server.step(600, None)
        status, body = await healthz(http, url)
        assert status == 200 and body["mode"] == "sim" and body["last_slot"] == 600, body
        assert body["lag_seconds"] == 0 and body["round"] == 600, body
        samples = await scrape(http, url)
        assert value(samples, "microte_rounds_processed_total") == 1
        assert "microte_heartbeat_age_seconds" not in samples


def test_servers_in_one_process_have_their_own_registries(ledger_url: str) -> None:
    a, b = (MarketServer(RT, registry(), open_sink(ledger_url)) for _ in range(2))
    ma, mb = observe.attach(web.Application(), a), observe.attach(web.Application(), b)  # no duplicate names
    ma.refused("rate_limited")
    ma.observe_ack(0.001)
    sa = {f.name: f for f in text_string_to_metric_families(generate_latest(ma.registry).decode())}
    sb = {f.name: f for f in text_string_to_metric_families(generate_latest(mb.registry).decode())}
    assert sa.keys() == sb.keys()

    def count(families: dict[str, Any], name: str, **labels: str) -> float:
        samples = families[name].samples
        return sum(
            s.value for s in samples if s.name.endswith(("_total", "_count")) and labels.items() <= s.labels.items()
        )

    assert count(sa, "microte_refused", code="rate_limited") == 1
    assert count(sb, "microte_refused", code="rate_limited") == 0
    assert count(sa, "microte_ack_latency_seconds") == 1 and count(sb, "microte_ack_latency_seconds") == 0


def test_health_and_a_scrape_cost_at_most_milliseconds() -> None:
    server = MarketServer(RT, registry(), open_sink("memory:"))
    metrics = observe.attach(web.Application(), server)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        metrics.health().body()
        generate_latest(metrics.registry)
    assert (time.perf_counter() - t0) / n < 0.02  # generous: milliseconds on a loaded 2-core machine
