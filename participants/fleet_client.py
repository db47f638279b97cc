"""Many prosumers over one socket.io connection (`/fleet`), each authenticated with its
own token: one `start_round` in, one `orders` and one `meters` batch out per round."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import socketio

from market.core import wire
from market.core.protocol import MAX_FLEET_ITEMS
from participants.messages import Delivery, DeliveryColumns, Settled, SettledColumns, StartRound, parse
from participants.population import Fill, Population, plain
from participants.prosumer import Prosumer, Stats
from participants.sites import site_for
from participants.spec import ParticipantSpec
from participants.synthetic import DAY, day_slot

log = logging.getLogger(__name__)
# Credentials per login message: the connect packet must stay under the server's 64 KB
# budget before login (market/server/guard.py); `join` events carry the rest.
LOGIN_BYTES = 32_000
PIPELINE = 250  # prosumers decided per chunk of a round's orders and readings
AHEAD = 16  # rounds ahead that `_ahead` builds profiles, a sixteenth of the prosumers a round
# `delivery.columns` tables held for `_account_deliveries` (past this, the oldest is accounted
# at once: a server that sends deliveries and no rounds cannot grow the list).
MAX_HELD_DELIVERIES = 8
ORDER_FIELDS = ("side", "quantity", "price", "time_delivery", "id", "source")


def _login_chunks(creds: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    chunks: list[list[dict[str, str]]] = [[]]
    size = 0
    for cred in creds:
        n = len(cred["id"]) + len(cred["token"]) + 24  # its JSON, with a little to spare
        if chunks[-1] and size + n > LOGIN_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(cred)
        size += n
    return chunks


class FleetClient:
    def __init__(
        self,
        members: Sequence[tuple[ParticipantSpec, str]],
        seed: int,
        *,
        timezone: str = "UTC",
        base_dir: str | Path | None = None,
        serializer: str = "json",
        timeout: float = 60.0,
        columns: bool = True,
        population: bool = True,
    ) -> None:
        """`columns`: send `orders.columns` / `meters.columns` and take `settled.columns` /
        `delivery.columns` (docs/protocol.md), else the v1 batches (the same ledger).
        `population`: the plain prosumers decide as one `Population`
        (participants/population.py), else a `Prosumer` each (the reference: the same
        ledger); the others are in `prosumers`."""
        specs = [spec for spec, _ in members]
        together = [s for s in specs if population and plain(s)]
        self.population = Population(together, seed, timezone=timezone, base_dir=base_dir) if together else None
        self._members = self.population.index if self.population is not None else {}
        self.prosumers = {
            s.id: site_for(s, seed, timezone=timezone, base_dir=base_dir, others=specs)
            for s in specs
            if s.id not in self._members
        }
        self._logins = _login_chunks([{"id": spec.id, "token": token} for spec, token in members])
        self.timeout = timeout
        self.columns = columns
        self.errors = 0
        self._held_deliveries: list[DeliveryColumns] = []  # checked, not yet accounted
        self.sio = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
        self.sio.on("start_round", self._on_start_round, namespace="/fleet")
        self.sio.on("settled", self._on_settled, namespace="/fleet")
        self.sio.on("delivery", self._on_delivery, namespace="/fleet")
        self.sio.on("settled.columns", self._on_settled_columns, namespace="/fleet")
        self.sio.on("delivery.columns", self._on_delivery_columns, namespace="/fleet")

    def warm(self, slots: Sequence[tuple[int, int]]) -> None:
        """Compute every prosumer's energy of `slots` now (the first round's, before
        connecting): building a day of profiles costs ~0.5 ms a prosumer, which on the
        first `start_round` of thousands outlasts the round's deadline."""
        for prosumer in self.prosumers.values():
            prosumer.warm(slots)
        if self.population is not None:
            self.population.warm(slots)

    async def connect(self, url: str, *, wait_timeout: float = 30.0) -> None:
        first, *rest = self._logins
        await self.sio.connect(
            url,
            auth={"fleet": first, "columns": self.columns},
            namespaces=["/fleet"],
            transports=["websocket"],
            wait_timeout=wait_timeout,
        )
        for chunk in rest:  # the connect packet is held to the pre-login byte budget
            reply = await self.sio.call("join", {"fleet": chunk}, namespace="/fleet", timeout=self.timeout)
            if not (isinstance(reply, dict) and reply.get("ok")):
                await self.sio.disconnect()
                raise ConnectionError(f"/fleet join refused: {reply}")

    async def disconnect(self) -> None:
        await self.sio.disconnect()

    def stats(self) -> dict[str, Stats]:
        self._account_deliveries()
        out = {pid: p.stats for pid, p in self.prosumers.items()}
        if self.population is not None:
            out |= {pid: self.population.stats_of(i) for pid, i in self._members.items()}
        return out

    def _count(self, pid: str, name: str) -> None:
        """One more of stats counter `name` for `pid` (a member or a prosumer)."""
        i = self._members.get(pid)
        if i is not None:
            assert self.population is not None
            self.population.stats[name][i] += 1
        else:
            stats = self.prosumers[pid].stats
            setattr(stats, name, getattr(stats, name) + 1)

    async def _on_start_round(self, payload: Any) -> None:
        try:  # decoded once for every prosumer of the connection (and its facts computed once)
            msg = parse(payload, StartRound)
        except ValueError:
            log.exception("start_round: bad payload")
            self.errors += 1
            return
        # Decided and sent a chunk of prosumers at a time, so that the server books one
        # chunk while this process decides the next (two cores, not one after the other).
        # Orders before readings on the one connection, whose events the server books in
        # order: every order of the round is booked before its last reading lets the
        # controller step on. Replies are awaited at the end.
        sent: list[tuple[str, list[str], asyncio.Future[Any]]] = []
        if self.population is not None:  # the members at once (a few us each), sent in batches
            try:
                for event, pids, data in self._population_batches(msg):
                    sent.append((event, pids, await self._emit(event, data)))
            except Exception:
                log.exception("start_round: the population failed")
                self.errors += 1
            await asyncio.sleep(0)
        members = list(self.prosumers.items())
        for i in range(0, len(members), PIPELINE):
            orders, readings = self._decide(msg, members[i : i + PIPELINE])
            for event, pids, data in self._batches(orders, readings):
                sent.append((event, pids, await self._emit(event, data)))
            await asyncio.sleep(0)  # the write loop sends them now, while the next chunk is decided
        for event, pids, reply in sent:
            try:
                result = await asyncio.wait_for(reply, self.timeout)
            except Exception as exc:  # timeout or disconnect: counted, never raised
                result = {"ok": False, "error": {"code": "unavailable", "message": str(exc) or type(exc).__name__}}
            self._record(event, pids, result)
        self._account_deliveries()  # while the server processes the slot, as is `_ahead`
        self._ahead(msg)

    def _ahead(self, msg: StartRound) -> None:
        """Build a share of the prosumers' profiles AHEAD slots on, each prosumer once in
        AHEAD rounds: the round whose next_settle enters a new day would otherwise build
        every prosumer's day at once (~0.4 ms each: 4 s at 10,000, near the deadline)."""
        start, end = msg.next_settle
        d = end - start
        if d <= 0:
            return
        phase = (start // d) % AHEAD
        ahead = (start + AHEAD * d, end + AHEAD * d)
        if DAY % d == 0 and day_slot(ahead[0], d)[:2] == day_slot(start, d)[:2]:
            # The same day block as this share's last visit, AHEAD slots ago: built then (or
            # before the first round), so every call would find it and build nothing.
            return
        for prosumer in list(self.prosumers.values())[phase::AHEAD]:
            prosumer.warm([ahead])
        if self.population is not None:
            self.population.prepare(ahead, range(phase, len(self.population), AHEAD))

    def _population_batches(self, msg: StartRound) -> list[tuple[str, list[str], dict[str, Any]]]:
        """The population's orders and readings of the round: (event, participants, payload)
        of each batch, orders first."""
        assert self.population is not None
        meters, orders = self.population.on_round(msg)
        ids = self.population.ids
        out: list[tuple[str, list[str], dict[str, Any]]] = []
        if orders is not None and len(orders):
            if self.columns:
                for j in range(0, len(orders), MAX_FLEET_ITEMS):
                    pids, data = orders.columns(ids, j, j + MAX_FLEET_ITEMS)
                    out.append(("orders.columns", pids, data))
            else:
                items = [(ids[m], o) for m, o in orders.orders()]
                out += self._batches(items, [])
        if meters is not None:
            for j in range(0, len(ids), MAX_FLEET_ITEMS):
                rows = range(j, min(j + MAX_FLEET_ITEMS, len(ids)))
                pids = ids[j : j + MAX_FLEET_ITEMS]
                if self.columns:
                    out.append(("meters.columns", pids, meters.columns(rows, pids)))
                else:
                    out += self._batches([], [(ids[i], meters.reading(i)) for i in rows])
        return out

    def _decide(
        self, msg: StartRound, members: list[tuple[str, Prosumer]]
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
        orders: list[tuple[str, dict[str, Any]]] = []
        readings: list[tuple[str, dict[str, Any]]] = []
        for pid, prosumer in members:
            try:
                meter, own = prosumer.on_round_msg(msg)
            except Exception:
                log.exception("%s: start_round failed", pid)
                prosumer.stats.errors += 1
                continue
            orders += [(pid, o) for o in own]
            if meter is not None:
                readings.append((pid, meter))
        return orders, readings

    def _batches(
        self, orders: list[tuple[str, dict[str, Any]]], readings: list[tuple[str, dict[str, Any]]]
    ) -> list[tuple[str, list[str], dict[str, Any]]]:
        """(event, its participants, payload) of each batch: orders first."""
        out = []
        for items, encode in ((orders, self._orders), (readings, self._meters)):
            for j in range(0, len(items), MAX_FLEET_ITEMS):
                chunk = items[j : j + MAX_FLEET_ITEMS]
                event, data = encode(chunk)
                out.append((event, [pid for pid, _ in chunk], data))
        return out

    def _orders(self, chunk: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
        if not self.columns:
            return "orders", {"orders": [{"participant": pid, **o} for pid, o in chunk]}
        cols: dict[str, list[Any]] = {k: [] for k in ORDER_FIELDS}
        cols["participant"] = [pid for pid, _ in chunk]
        for _, o in chunk:
            for k in ORDER_FIELDS:
                cols[k].append(o.get(k))
        return "orders.columns", cols

    def _meters(self, chunk: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
        if not self.columns:
            return "meters", {"readings": [{"participant": pid, **m} for pid, m in chunk]}
        n = len(chunk)
        tables: dict[str, dict[str, list[int | None]]] = {"generation": {}, "bess": {}, "other": {}}
        for i, (_, m) in enumerate(chunk):
            consumption = m.get("consumption", {})
            for name, values in (
                ("generation", m.get("generation", {})),
                ("bess", consumption.get("bess", {})),
                ("other", consumption.get("other", {})),
            ):
                table = tables[name]
                for src, wh in values.items():
                    column = table.get(src)
                    if column is None:
                        column = table[src] = [None] * n  # null: this reading has no such entry
                    column[i] = wh
        data = {"participant": [pid for pid, _ in chunk], "time_interval": [m["time_interval"] for _, m in chunk]}
        return "meters.columns", {**data, **{k: v for k, v in tables.items() if v}}

    async def _emit(self, event: str, data: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue an acknowledged event (as `sio.call` does, without waiting for the reply)."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answered(*args: Any) -> None:
            if not reply.done():
                reply.set_result(args[0] if len(args) == 1 else list(args))

        try:
            await self.sio.emit(event, data, namespace="/fleet", callback=answered)
        except Exception as exc:  # disconnected: the reply is the failure
            reply.set_exception(exc)
        return reply

    def _record(self, event: str, pids: list[str], reply: Any) -> None:
        if not (isinstance(reply, dict) and reply.get("ok")):
            self.errors += 1
            for pid in pids:
                self._count(pid, "errors")
            return
        if event.endswith(".columns"):  # the refused by index; the rest accepted
            refused = {r.get("index") for r in reply.get("refused", []) if isinstance(r, dict)}
            results = [i not in refused for i in range(len(pids))]
        else:
            results = [isinstance(r, dict) and r.get("ok") is True for r in reply.get("results", [])]
        for pid, ok in zip(pids, results, strict=False):
            if event.startswith("orders"):
                self._count(pid, "accepted" if ok else "rejected")
            elif not ok:
                self._count(pid, "errors")

    async def _on_settled(self, batch: Any) -> None:
        self._dispatch(batch, Settled, "on_settled_msg")

    async def _on_delivery(self, batch: Any) -> None:
        self._dispatch(batch, Delivery, "on_delivery_msg")

    async def _on_settled_columns(self, payload: Any) -> None:
        try:
            table = parse(payload, SettledColumns)
        except ValueError:
            log.exception("settled.columns: bad payload")
            self.errors += 1
            return
        pop, members = self.population, self._members
        side, quantity, interval, commit_id, source = (
            table.side,
            table.quantity,
            table.time_delivery,
            table.commit_id,
            table.source,
        )
        fills: list[Fill] = []
        for k, pid in enumerate(table.participant):
            i = members.get(pid)
            if i is not None:
                fills.append((i, interval[k][0], commit_id[k], side[k], quantity[k], source[k]))
            else:
                self._to_prosumer(pid, "on_settled_msg", table.event(k))
        if fills:
            assert pop is not None
            pop.on_fills(fills)

    async def _on_delivery_columns(self, payload: Any) -> None:
        """Checked now, accounted once the next round's orders and readings are sent: a
        delivery changes only bills and counters (no decision reads them), and the `step`
        reply after it on the loop of a `microte sim` run waited ~1 ms for it at 1,000."""
        try:
            table = parse(payload, DeliveryColumns)
        except ValueError:
            log.exception("delivery.columns: bad payload")
            self.errors += 1
            return
        self._held_deliveries.append(table)
        if len(self._held_deliveries) > MAX_HELD_DELIVERIES:
            self._account(self._held_deliveries.pop(0))

    def _account_deliveries(self) -> None:
        held, self._held_deliveries = self._held_deliveries, []
        for table in held:
            self._account(table)

    def _account(self, table: DeliveryColumns) -> None:
        members, together = self._members, []
        for k, pid in enumerate(table.participant):
            i = members.get(pid)
            if i is not None:
                together.append((i, table.rows[k]))
            else:
                self._to_prosumer(pid, "on_delivery_msg", table.event(k))
        if together:
            assert self.population is not None
            self.population.on_delivery_columns(table.time_delivery[0], together, table.transactions)

    def _to_prosumer(self, pid: object, method: str, msg: Settled | Delivery) -> None:
        """A member's event to its own `Prosumer` (an error if `pid` is none of them)."""
        prosumer = self.prosumers.get(pid) if isinstance(pid, str) else None
        if prosumer is None:
            self.errors += 1
            return
        try:
            getattr(prosumer, method)(msg)
        except ValueError:
            log.exception("%s: bad %s payload", pid, type(msg).__name__)
            prosumer.stats.errors += 1

    def _dispatch(self, batch: Any, kind: type[Settled] | type[Delivery], method: str) -> None:
        events = batch.get("events") if isinstance(batch, dict) else None
        if not isinstance(events, list):
            self.errors += 1
            return
        try:  # the whole batch in one conversion (unknown fields such as `participant` ignored)
            msgs: list[Any] = msgspec.convert(events, list[kind], strict=False)  # type: ignore[valid-type]
        except msgspec.ValidationError:
            msgs = []
            for event in events:  # one at a time, so that one bad event costs only its own
                try:
                    msgs.append(parse(event, kind))
                except ValueError:
                    msgs.append(None)
        pop, members = self.population, self._members
        for event, msg in zip(events, msgs, strict=True):
            pid = event.get("participant") if isinstance(event, dict) else None
            i = members.get(pid) if isinstance(pid, str) else None
            if i is not None:
                assert pop is not None
                if msg is None:
                    log.error("%s: bad %s payload", pid, kind.__name__)
                    pop.stats["errors"][i] += 1
                elif kind is Settled:
                    pop.on_settled(i, msg)
                else:
                    pop.on_delivery(i, msg)
                continue
            prosumer = self.prosumers.get(pid) if isinstance(pid, str) else None
            if prosumer is not None and msg is None:
                log.error("%s: bad %s payload", prosumer.spec.id, kind.__name__)
                prosumer.stats.errors += 1
                continue
            self._to_prosumer(pid, method, msg)
