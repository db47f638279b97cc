"""A deterministic market day for 20 (or more) synthetic prosumers, without sockets.

`run()` drives `Prosumer.on_round` / `on_settled` / `on_delivery` with payloads built the
way `market.core.engine` builds them (`start_round_payload`, `_settled_events`, `_deliveries`),
with a small stand-in clearing, and returns everything the prosumers produced: the exact
`(meter, orders)` of every round and the final stats. `digest()` hashes it; the golden test
pins that hash so optimizations of the participants package cannot change behaviour.
Also used by `bench_prosumer.py` (the CPU micro-benchmark).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import numpy as np

from market.core.records import amount
from participants.prosumer import Prosumer
from participants.spec import ParticipantSpec, synthetic_spec

D = 900
CLOSE_STEPS = 2
SEED = 7
SPEC_SEED = 2024


def specs(n: int = 20) -> list[ParticipantSpec]:
    rng = np.random.default_rng(SPEC_SEED)
    return [synthetic_spec(i, rng) for i in range(n)]


def prices(start: int) -> tuple[float, float]:
    """(buy, sell) like `GridTariff.prices` with a fee of 1.0 and an hourly pattern."""
    sell = 0.04 + 0.02 * ((start // 3600) % 5)
    return sell * (1 + 1.0), sell


def grid_state(start: int) -> str:
    return "RED" if (start // D) % 17 == 0 else "GREEN"


def start_round_payload(t: int, mode: str, tz: str, last_round: tuple[int, int] | None) -> dict[str, Any]:
    """As `market.core.engine.Market.start_round_payload` (with `market.core.timing.round_times`)."""
    c = CLOSE_STEPS
    current, next_settle, last_settle = (t, t + D), (t + c * D, t + (c + 1) * D), (t + (c - 1) * D, t + c * D)
    slots = dict.fromkeys([current, last_settle, next_settle])
    return {
        "mode": mode,
        "time": t,
        "duration": D,
        "timezone": tz,
        "current_round": list(current),
        "last_round": list(last_round if last_round is not None else (t - D, t)),
        "next_settle": list(next_settle),
        "last_settle": list(last_settle),
        "market_info": [
            {
                "time_delivery": list(s),
                "grid": {"buy_price": prices(s[0])[0], "sell_price": prices(s[0])[1]},
                "grid_state": grid_state(s[0]),
            }
            for s in slots
        ],
    }


class Scenario:
    """Market stand-in: collects orders per slot, clears them when the slot closes, sends
    `settled` before `start_round` and a `delivery` per metered slot."""

    def __init__(self, prosumers: list[Prosumer], mode: str, tz: str) -> None:
        self.prosumers = prosumers
        self.mode = mode
        self.tz = tz
        self.book: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        self.fills: dict[int, list[dict[str, Any]]] = {}  # slot -> settlements
        self.out: list[Any] = []
        self.last_round: tuple[int, int] | None = None

    def _clear(self, start: int, now: int) -> list[tuple[str, dict[str, Any]]]:
        entries = self.book.pop(start, [])
        if grid_state(start) == "RED":
            return []
        bids = sorted(
            ((o, p) for p, o in entries if o["side"] == "bid"), key=lambda x: (-x[0]["price"], x[1], x[0]["id"])
        )
        asks = sorted(
            ((o, p) for p, o in entries if o["side"] == "ask"), key=lambda x: (x[0]["price"], x[1], x[0]["id"])
        )
        left = {id(o): o["quantity"] for o, _ in bids + asks}
        events: list[tuple[str, dict[str, Any]]] = []
        settlements = self.fills.setdefault(start, [])
        i = j = 0
        while i < len(bids) and j < len(asks):
            (bid, buyer), (ask, seller) = bids[i], asks[j]
            if bid["price"] < ask["price"]:
                break
            if buyer == seller:
                j += 1
                continue
            q = min(left[id(bid)], left[id(ask)])
            price = (bid["price"] + ask["price"]) / 2
            commit = f"c{start}-{len(settlements)}"
            settlements.append(
                {"seller": seller, "buyer": buyer, "q": q, "price": price, "source": ask.get("source", "")}
            )
            common = {
                "commit_id": commit,
                "quantity": q,
                "source": ask.get("source", ""),
                "time_delivery": bid["time_delivery"],
            }
            events.append((buyer, {**common, "uuid": f"u{buyer}", "id": bid["id"], "side": "bid", "price": price}))
            events.append((seller, {**common, "uuid": f"u{seller}", "id": ask["id"], "side": "ask", "price": price}))
            left[id(bid)] -= q
            left[id(ask)] -= q
            if not left[id(bid)]:
                i += 1
            if not left[id(ask)]:
                j += 1
        return events

    def _deliver(self, start: int, meters: dict[str, dict[str, Any]]) -> None:
        buy, sell = prices(start)
        rows: list[dict[str, Any]] = []
        for n, f in enumerate(self.fills.pop(start, [])):
            rows.append({
                "id": f"t{start}-p{n}", "kind": "p2p" if f["source"] != "bess" else "bess_compensation",
                "seller_id": f["seller"], "buyer_id": f["buyer"], "quantity": f["q"],
                "amount_buy": amount(f["q"], f["price"]), "amount_sell": amount(f["q"], f["price"]),
                "energy_source": f["source"], "time_creation": start, "extra": [1, 2],
            })  # fmt: skip
        for pid, m in sorted(meters.items()):
            imp = m["consumption"]["other"]["external"]
            exp = sum(m["generation"].values())
            if imp:
                rows.append({"kind": "grid_buy", "seller_id": "grid", "buyer_id": pid, "quantity": imp,
                             "amount_buy": amount(imp, buy), "amount_sell": amount(imp, buy)})  # fmt: skip
            if exp:
                rows.append({"kind": "grid_sell", "seller_id": pid, "buyer_id": "grid", "quantity": exp,
                             "amount_buy": amount(exp, sell), "amount_sell": amount(exp, sell)})  # fmt: skip
        by_party: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            for party in dict.fromkeys((row["seller_id"], row["buyer_id"])):
                by_party.setdefault(party, []).append(row)
        by_id = {p.spec.id: p for p in self.prosumers}
        for pid, txs in by_party.items():
            if pid in by_id:
                payload = {"time_delivery": [start, start + D], "transactions": txs}
                by_id[pid].on_delivery(payload)
                if (start // D) % 5 == 0:
                    by_id[pid].on_delivery(payload)  # duplicates are ignored

    def round(self, t: int) -> None:
        by_id = {p.spec.id: p for p in self.prosumers}
        closing = t + (CLOSE_STEPS - 1) * D
        events = [e for s in sorted(s for s in self.book if s <= closing) for e in self._clear(s, t)]
        for n, (pid, payload) in enumerate(events):
            by_id[pid].on_settled(payload)
            if n % 7 == 0:
                by_id[pid].on_settled(payload)  # a replayed fill: deduplicated by commit_id
        payload = start_round_payload(t, self.mode, self.tz, self.last_round)
        self.last_round = (t, t + D)
        meters: dict[str, dict[str, Any]] = {}
        for p in self.prosumers:
            meter, orders = p.on_round(payload)
            self.out.append([p.spec.id, t, meter, orders])
            if meter is not None:
                meters[p.spec.id] = meter
            for o in orders:
                self.book.setdefault(o["time_delivery"][0], []).append((p.spec.id, o))
        if meters:
            self._deliver(next(iter(meters.values()))["time_interval"][0], meters)


def local_midnight(day: dt.date, tz: str) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp())


def run(n: int = 20, seed: int = SEED) -> list[Any]:
    """Everything the prosumers produce in three runs (see the module docstring)."""
    out: list[Any] = []
    all_specs = specs(n)
    # 1. sim mode, UTC, a summer day; then a jump two days ahead (everything older than the
    #    kept window is forgotten at once) and a jump back (a reset: the prosumer restarts).
    s = Scenario([Prosumer(sp, seed) for sp in all_specs], "sim", "UTC")
    t0 = local_midnight(dt.date(2024, 6, 21), "UTC")
    times = [t0 + k * D for k in range(96)] + [t0 + 2 * 86400 + k * D for k in range(6)]
    times += [t0 + 40 * D + k * D for k in range(4)]
    for t in times:
        if s.last_round is not None and t < s.last_round[0]:
            out += s.out
            s = Scenario(s.prosumers, "sim", "UTC")  # the market was reset
        s.round(t)
    out += s.out
    out += [msgspec.to_builtins(p.stats) for p in s.prosumers]
    # 2. rt mode, Europe/Berlin, the day of the spring DST switch (a 23-hour local day).
    s = Scenario([Prosumer(sp, seed) for sp in all_specs], "rt", "Europe/Berlin")
    t0 = local_midnight(dt.date(2024, 3, 31), "Europe/Berlin")
    for k in range(96):
        s.round(t0 + k * D)
    out += s.out
    out += [msgspec.to_builtins(p.stats) for p in s.prosumers]
    # 3. sim mode, a winter week day in America/New_York (UTC-5: local days straddle UTC days).
    s = Scenario([Prosumer(sp, seed, timezone="America/New_York") for sp in all_specs], "sim", "America/New_York")
    t0 = local_midnight(dt.date(2024, 1, 17), "America/New_York")
    for k in range(96):
        s.round(t0 + k * D)
    out += s.out
    out += [msgspec.to_builtins(p.stats) for p in s.prosumers]
    return out


def digest(out: list[Any]) -> str:
    return hashlib.sha256(json.dumps(out, separators=(",", ":")).encode()).hexdigest()


if __name__ == "__main__":
    result = run()
    print(len(result), digest(result))
