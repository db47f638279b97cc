"""Health and metrics routes of the market server (docs/operations.md).

`attach(app, server)` adds `GET /healthz` (200 or 503, a JSON body) and `GET /metrics`
(the Prometheus text format) to the aiohttp app, and returns the server's `Metrics`: its
own `CollectorRegistry` (several servers in one process do not clash) and the two calls
the handlers make on the hot path, `observe_ack(seconds)` and `refused(code)`.

Everything else is read when somebody asks: a collector reads the server's counters and
gauges at scrape time, so nothing is updated between scrapes, and neither route takes the
round lock or awaits anything (they answer while a round is being processed or stored).
What is read of the server is `Observed`, nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, get_args

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from market.core.engine import MarketConfig
from market.core.errors import ErrorCode
from market.core.records import RoundRecord
from market.core.timing import RoundTimes

# Acknowledgement latency buckets (seconds): an ack is a ledger write, a millisecond or so.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)


class _Clock(Protocol):
    def now(self) -> int: ...


class _Market(Protocol):
    @property
    def times(self) -> RoundTimes | None: ...  # the open round


class _Sessions(Protocol):
    @property
    def sid_of(self) -> Mapping[str, str]: ...  # participant id -> sid


class _Commits(Protocol):  # market.server.commit.GroupCommit
    @property
    def depth(self) -> int: ...

    @property
    def writes(self) -> int: ...

    @property
    def last_write_s(self) -> float: ...

    @property
    def write_s_total(self) -> float: ...


class _Guard(Protocol):  # market.server.guard.ConnectionGuard
    @property
    def pending(self) -> int: ...

    @property
    def connections(self) -> int: ...

    @property
    def refused(self) -> int: ...

    @property
    def closed_unauthenticated(self) -> int: ...


class Observed(Protocol):
    """What the routes read of `MarketServer`; every member is read, never written."""

    @property
    def config(self) -> MarketConfig: ...

    @property
    def clock(self) -> _Clock: ...  # the market clock (sim: the last `step`)

    @property
    def market(self) -> _Market: ...

    @property
    def sessions(self) -> Mapping[str, _Sessions]: ...  # namespace -> its sessions

    @property
    def commits(self) -> _Commits: ...

    @property
    def guard(self) -> _Guard: ...

    @property
    def caught_up(self) -> int: ...  # slots processed after a boundary later than their own

    @property
    def heartbeat(self) -> float: ...  # time.monotonic() of the last rt boundary the loop reached

    @property
    def ledger_ok(self) -> bool: ...  # the last ledger write succeeded

    @property
    def ledger_failures(self) -> int: ...  # ledger writes that failed

    @property
    def rounds_processed(self) -> int: ...  # slots processed and stored

    def last_processed(self) -> RoundRecord | None: ...  # the last processed round, if any


class Health:
    """One reading of the server's health (`/healthz` and the `microte_*` gauges)."""

    def __init__(self, server: Observed) -> None:
        self.server = server
        config = server.config
        self.mode = config.mode
        last = server.last_processed()
        self.last_slot = last.current_round_start if last is not None else None
        self.lag: float | None = None
        if last is not None:
            now = time.time() if config.mode == "rt" else float(server.clock.now())
            # 0 on schedule: a slot is processed about a duration after it ends (rt: at the
            # next boundary plus the meter grace).
            self.lag = max(0.0, now - (last.current_round_start + last.duration) - last.duration)
        self.heartbeat_age: float | None = None
        self.loop_alive = True  # sim: `step` drives the rounds, there is no loop to die
        if config.mode == "rt":
            self.heartbeat_age = max(0.0, time.monotonic() - server.heartbeat)
            self.loop_alive = self.heartbeat_age <= 2 * config.duration + config.meter_grace
        self.ledger_ok = server.ledger_ok
        self.ok = self.loop_alive and self.ledger_ok

    def body(self) -> dict[str, Any]:
        times = self.server.market.times
        return {
            "status": "ok" if self.ok else "unavailable",
            "mode": self.mode,
            "round": times.time if times is not None else None,
            "last_slot": self.last_slot,
            "lag_seconds": None if self.lag is None else round(self.lag, 3),
            "round_loop": "alive" if self.loop_alive else "dead",
            "heartbeat_age_seconds": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
            "ledger": "ok" if self.ledger_ok else "failing",
            "ledger_queue": self.server.commits.depth,
        }


class _ServerCollector(Collector):
    """Reads the server at scrape time: no gauge is set from the hot path."""

    def __init__(self, server: Observed) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        health = Health(s)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("microte_rounds_processed", "Slots processed and stored", s.rounds_processed)
        yield counter("microte_slots_caught_up", "Slots processed after a later boundary (stall, restart)", s.caught_up)
        if health.lag is not None and health.last_slot is not None:
            yield gauge("microte_round_lag_seconds", "Seconds the last processed slot is behind schedule", health.lag)
            yield gauge(
                "microte_last_processed_slot", "Start (Unix seconds) of the last processed slot", health.last_slot
            )
        yield gauge(
            "microte_round_loop_alive", "1 while the round loop reaches its boundaries", float(health.loop_alive)
        )
        if health.heartbeat_age is not None:
            yield gauge(
                "microte_heartbeat_age_seconds", "Seconds since the round loop's last boundary", health.heartbeat_age
            )
        yield gauge("microte_ledger_ok", "1 if the last ledger write succeeded", float(health.ledger_ok))
        yield counter("microte_ledger_write_failures", "Ledger writes that failed", s.ledger_failures)
        commits = s.commits
        yield gauge(
            "microte_ledger_queue_depth", "Acknowledged records waiting for the next group commit", commits.depth
        )
        yield counter("microte_ledger_commits", "Group commits written (acknowledged actions)", commits.writes)
        yield gauge(
            "microte_ledger_last_commit_duration_seconds", "Duration of the last group commit", commits.last_write_s
        )
        yield counter(
            "microte_ledger_commit_seconds", "Time spent in group commits (over commits: mean)", commits.write_s_total
        )
        connected = GaugeMetricFamily(
            "microte_participants_connected", "Participants logged in, by namespace", labels=["namespace"]
        )
        for ns, sessions in s.sessions.items():
            connected.add_metric([ns], len(sessions.sid_of))
        yield connected
        guard = s.guard
        yield gauge("microte_connections", "Open engine.io connections", guard.connections)
        yield gauge("microte_connections_pending", "Connections that have not logged in yet", guard.pending)
        yield counter("microte_connections_refused", "Connections refused: their address was at its cap", guard.refused)
        yield counter(
            "microte_connections_closed_unauthenticated",
            "Connections closed for not logging in in time, or evicted by newer ones",
            guard.closed_unauthenticated,
        )


class Metrics:
    """One server's metrics: its registry, and the two calls of the event handlers."""

    def __init__(self, server: Observed) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(server))
        self._ack = Histogram(
            "microte_ack_latency_seconds",
            "Event received to reply sent (acknowledged actions, ledger write included)",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self._refused = Counter(
            "microte_refused", "Events answered with an error, by code", ["code"], registry=self.registry
        )
        for code in ERROR_CODES:  # every code is scraped, 0 until it happens
            self._refused.labels(code)

    def observe_ack(self, seconds: float) -> None:
        """One acknowledgement took `seconds` (costs about a microsecond: call it from the handler)."""
        self._ack.observe(seconds)

    def refused(self, code: str) -> None:
        """One event was answered with error `code` (a code PROTOCOL.md does not define counts
        as `other`: the series stay bounded)."""
        self._refused.labels(code if code in ERROR_CODES else "other").inc()

    def health(self) -> Health:
        return Health(self.server)

    async def healthz(self, _request: web.Request) -> web.Response:
        health = Health(self.server)
        return web.json_response(health.body(), status=200 if health.ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})


METRICS = web.AppKey("microte.metrics", Metrics)


def attach(app: web.Application, server: Observed) -> Metrics:
    """Add `GET /healthz` and `GET /metrics` to `app` (before its runner starts) and return
    the server's `Metrics`. Attaching twice to one app returns the first `Metrics`."""
    existing = app.get(METRICS)
    if existing is not None:
        return existing
    metrics = Metrics(server)
    app[METRICS] = metrics
    app.router.add_get("/healthz", metrics.healthz, allow_head=False)
    app.router.add_get("/metrics", metrics.metrics, allow_head=False)
    return metrics
