"""The live dashboard (docs/dashboard.md): `GET /dashboard` and the read-only `/observe` namespace.

Roles `operator` and `dso` log in to `/observe` like any participant (`{id, token}`) and
hear `snapshot` events: the open round and its countdown, the book per open slot, the
recent clearings and fills, who is online and who missed its readings, grid states and the
ledger's health. The namespace has one event of its own, `snapshot` (the current one, as
the reply); nothing it offers changes the market.

What it costs the market: one `cleared` call per round (it keeps a reference to the
round's fills, never copies or sums them) and nothing else on the round path. The
`DashboardFeed` task builds a snapshot at most every `FEED_INTERVAL` seconds and only while
an observer is connected (with none it sleeps on an event), sends it only when it changed
(encoded once for all observers), and skips an observer whose connection still holds unsent
packets (a slow reader gets the next snapshot, never a queue). It never takes the round lock.

The page, its script and style are files next to this module, served by the market
server itself: no CDN, it works offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from market.core.engine import Market, MarketConfig, RoundOpen
from market.core.protocol import EmptyMsg, decode
from market.core.records import RoundRecord, Settlement
from market.core.registry import Registry, Role
from market.core.timing import RealTimeClock, SimClock
from market.dispatch.base import Namespace, ServerPort, replying
from market.server.observe import Health

log = logging.getLogger("microte.dashboard")

STATIC = Path(__file__).with_name("static")
ASSETS = {  # URL -> (file, content type)
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
}
FEED_INTERVAL = 0.25  # seconds between snapshots at most
BOOK_SLOTS = 12  # open slots shown, earliest first
RECENT_ROUNDS = 60  # clearings kept for the chart
RECENT_FILLS = 20  # fills listed, newest first
MISSING_SHOWN = 50  # ids of missing participants listed (the count is always exact)
MAX_UNSENT = 8  # an observer with more packets waiting is skipped this time
ROOM = "observers"  # every logged-in session of /observe


class Watched(ServerPort, Protocol):
    """What the dashboard reads of `MarketServer` (with `Observed`, for `Health`), never writes."""

    config: MarketConfig
    market: Market
    registry: Registry
    clock: SimClock | RealTimeClock
    rounds_processed: int
    ledger_ok: bool
    ledger_failures: int

    @property
    def commits(self) -> Any: ...  # market.server.commit.GroupCommit

    def online(self) -> list[str]: ...

    def market_ids_of(self, role: str) -> list[str]: ...

    def last_processed(self) -> RoundRecord | None: ...

    def health(self) -> Health: ...


class Recent:
    """The last rounds' clearings: references to each round's stored fills."""

    def __init__(self) -> None:
        self.rounds: deque[tuple[int, int, Sequence[Settlement]]] = deque(maxlen=RECENT_ROUNDS)

    def cleared(self, opened: RoundOpen) -> None:
        """The round `opened` cleared its slot and its fills are stored (O(1))."""
        self.rounds.append((opened.times.time, opened.times.last_settle[0], opened.settlements))

    def clear(self) -> None:
        self.rounds.clear()

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for t, slot, fills in self.rounds:
            wh = sum(f.quantity for f in fills)
            out.append(
                {
                    "time": t,
                    "slot": slot,
                    "fills": len(fills),
                    "volume_wh": wh,
                    # volume-weighted prices: what buyers paid and sellers got per kWh
                    "price_buy": _vwap([(f.quantity, f.price_buy) for f in fills], wh),
                    "price_sell": _vwap([(f.quantity, f.price_sell) for f in fills], wh),
                }
            )
        return out

    def fills(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _t, _slot, fills in reversed(self.rounds):
            for f in reversed(fills):
                if len(out) == RECENT_FILLS:
                    return out
                out.append(
                    {
                        "commit_id": f.commit_id,
                        "slot": f.time_delivery_start,
                        "seller": f.seller_id,
                        "buyer": f.buyer_id,
                        "quantity": f.quantity,
                        "price_buy": f.price_buy,
                        "price_sell": f.price_sell,
                    }
                )
        return out


def _vwap(fills: Sequence[tuple[int, float]], wh: int) -> float | None:
    return round(sum(q * p for q, p in fills) / wh, 6) if wh else None


def snapshot(server: Watched, recent: Recent) -> dict[str, Any]:
    """Everything the dashboard shows, as JSON-ready data (docs/dashboard.md)."""
    market, config = server.market, server.config
    times = market.times
    now = server.clock.now()
    round_: dict[str, Any] | None = None
    if times is not None:
        closes_in = None
        if config.mode == "rt":  # the round ends at the next boundary; sim: when the controller steps
            closes_in = max(0, times.time + times.duration - now)
        round_ = {
            "time": times.time,
            "duration": times.duration,
            "current_round": list(times.current_round),
            "next_settle": list(times.next_settle),
            "closes_in": closes_in,
        }
    grid = market.grid_states
    book = [
        {
            "slot": d.start,
            "grid_state": grid.get(d.start),
            "bids": d.bids,
            "bid_wh": d.bid_wh,
            "best_bid": d.best_bid,
            "asks": d.asks,
            "ask_wh": d.ask_wh,
            "best_ask": d.best_ask,
        }
        for d in market.book.depth(BOOK_SLOTS)
    ]
    states = []
    if times is not None:  # the slots of the open round (trading, matched, delivering)
        for slot in dict.fromkeys([times.current_round[0], times.last_settle[0], times.next_settle[0]]):
            states.append({"slot": slot, "grid_state": grid.get(slot)})
    rounds = recent.summary()
    prosumers = server.market_ids_of("prosumer")
    online = set(server.online())
    offline = [p for p in prosumers if p not in online]
    last: RoundRecord | None = server.last_processed()
    missed: list[str] = json.loads(last.missing) if last is not None else []
    health = server.health()
    return {
        "mode": config.mode,
        "now": now,
        "round": round_,
        "rounds_processed": server.rounds_processed,
        "book": book,
        "grid_states": states,
        "last_clearing": rounds[-1] if rounds else None,
        "rounds": rounds,
        "fills": recent.fills(),
        "participants": {
            "registered": len(prosumers),
            "online": len(prosumers) - len(offline),
            "offline": len(offline),
            "offline_ids": offline[:MISSING_SHOWN],
        },
        "last_processed": None
        if last is None
        else {
            "slot": last.current_round_start,
            "metered": last.metered,
            "missing": len(missed),
            "missing_ids": missed[:MISSING_SHOWN],
        },
        "ledger": {
            "ok": server.ledger_ok,
            "failures": server.ledger_failures,
            "queue": server.commits.depth,
            "lag_seconds": None if health.lag is None else round(health.lag, 3),
        },
    }


class ObserveNamespace(Namespace):
    """`/observe`: read-only, for the operator and the DSO."""

    ms: Watched

    NAME = "/observe"
    ROLES = frozenset[Role]({"operator", "dso"})

    def __init__(self, server: Watched, feed: DashboardFeed) -> None:
        super().__init__(server)
        self.feed = feed

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        await super().on_connect(sid, environ, auth)
        await self.enter_room(sid, ROOM)
        self.feed.watched.set()

    @replying
    async def on_snapshot(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid)
        decode(data, EmptyMsg)
        return {"snapshot": snapshot(self.ms, self.feed.recent)}


class DashboardFeed:
    """Pushes a changed snapshot to the observers, at most every `FEED_INTERVAL` seconds."""

    def __init__(self, server: Watched, sio: Any) -> None:
        self.server = server
        self.sio = sio  # market.server.guard.GuardedServer
        self.recent = Recent()
        self.watched = asyncio.Event()  # set while an observer may be connected
        self.namespace = ObserveNamespace(server, self)
        self.built = 0  # snapshots built for the feed (0 while nobody watches)
        self.sent = 0  # snapshots sent (one per observer)
        self.skipped = 0  # snapshots not sent to an observer that had not read the last ones

    async def run(self) -> None:
        last: dict[str, Any] | None = None
        sessions = self.namespace.sessions
        while True:
            await self.watched.wait()
            if not sessions.sid_of:
                self.watched.clear()  # nobody watches: sleep until somebody logs in
                last = None
                continue
            snap = snapshot(self.server, self.recent)
            self.built += 1
            if snap != last:
                last = snap
                await self.broadcast(snap)
            await asyncio.sleep(FEED_INTERVAL)

    async def broadcast(self, snap: dict[str, Any]) -> None:
        """Send `snap` to every observer that has read what it was sent before: one emit to
        the observers' room, so the snapshot is encoded once however many watch."""
        ns = ObserveNamespace.NAME
        sids = list(self.namespace.sessions.pid_of)
        slow = []
        for sid in sids:
            eio_sid = None
            with contextlib.suppress(KeyError):  # gone since the list was taken
                eio_sid = self.sio.manager.eio_sid_from_sid(sid, ns)
            if eio_sid is None or self.sio.queued(eio_sid) > MAX_UNSENT:
                slow.append(sid)
        self.skipped += len(slow)
        if len(slow) < len(sids):
            await self.sio.emit("snapshot", snap, to=ROOM, skip_sid=slow, namespace=ns)
            self.sent += len(sids) - len(slow)


def attach(app: web.Application) -> None:
    """Serve the page and its assets (read once, at start)."""
    for url, (name, content_type) in ASSETS.items():
        body = (STATIC / name).read_bytes()

        async def asset(_request: web.Request, body: bytes = body, content_type: str = content_type) -> web.Response:
            return web.Response(
                body=body, content_type=content_type, charset="utf-8", headers={"Cache-Control": "no-cache"}
            )

        app.router.add_get(url, asset, allow_head=False)
