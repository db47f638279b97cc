"""Many prosumers over one socket.io connection (`/fleet`), each authenticated with its
own token: one `start_round` in, one `orders` and one `meters` batch out per round."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import socketio

from market.core import wire
from market.core.protocol import MAX_FLEET_ITEMS
from participants.messages import StartRound, parse
from participants.prosumer import Stats
from participants.sites import site_for
from participants.spec import ParticipantSpec

log = logging.getLogger(__name__)


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
    ) -> None:
        specs = [spec for spec, _ in members]
        self.prosumers = {s.id: site_for(s, seed, timezone=timezone, base_dir=base_dir, others=specs) for s in specs}
        self._auth = {"fleet": [{"id": spec.id, "token": token} for spec, token in members]}
        self.timeout = timeout
        self.errors = 0
        self.sio = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
        self.sio.on("start_round", self._on_start_round, namespace="/fleet")
        self.sio.on("settled", self._on_settled, namespace="/fleet")
        self.sio.on("delivery", self._on_delivery, namespace="/fleet")

    async def connect(self, url: str, *, wait_timeout: float = 30.0) -> None:
        await self.sio.connect(
            url, auth=self._auth, namespaces=["/fleet"], transports=["websocket"], wait_timeout=wait_timeout
        )

    async def disconnect(self) -> None:
        await self.sio.disconnect()

    def stats(self) -> dict[str, Stats]:
        return {pid: p.stats for pid, p in self.prosumers.items()}

    async def _on_start_round(self, payload: Any) -> None:
        orders: list[dict[str, Any]] = []
        readings: list[dict[str, Any]] = []
        try:  # decoded once for every prosumer of the connection (and its facts computed once)
            msg = parse(payload, StartRound)
        except ValueError:
            log.exception("start_round: bad payload")
            self.errors += 1
            return
        for pid, prosumer in self.prosumers.items():
            try:
                meter, own = prosumer.on_round_msg(msg)
            except Exception:
                log.exception("%s: start_round failed", pid)
                prosumer.stats.errors += 1
                continue
            orders += [{"participant": pid, **o} for o in own]
            if meter is not None:
                readings.append({"participant": pid, **meter})
        # Orders first: the last reading of the round lets the controller step on.
        for event, key, items in (("orders", "orders", orders), ("meters", "readings", readings)):
            for i in range(0, len(items), MAX_FLEET_ITEMS):
                chunk = items[i : i + MAX_FLEET_ITEMS]
                try:
                    reply = await self.sio.call(event, {key: chunk}, namespace="/fleet", timeout=self.timeout)
                except Exception as exc:  # timeout or disconnect: counted, never raised
                    reply = {"ok": False, "error": {"code": "unavailable", "message": str(exc)}}
                self._record(event, chunk, reply)

    def _record(self, event: str, chunk: list[dict[str, Any]], reply: Any) -> None:
        if not (isinstance(reply, dict) and reply.get("ok")):
            self.errors += 1
            for item in chunk:
                self.prosumers[item["participant"]].stats.errors += 1
            return
        for item, result in zip(chunk, reply.get("results", []), strict=False):
            stats = self.prosumers[item["participant"]].stats
            ok = isinstance(result, dict) and result.get("ok") is True
            if event == "orders":
                if ok:
                    stats.accepted += 1
                else:
                    stats.rejected += 1
            elif not ok:
                stats.errors += 1

    async def _on_settled(self, batch: Any) -> None:
        self._dispatch(batch, "on_settled")

    async def _on_delivery(self, batch: Any) -> None:
        self._dispatch(batch, "on_delivery")

    def _dispatch(self, batch: Any, method: str) -> None:
        for event in batch.get("events", []) if isinstance(batch, dict) else []:
            prosumer = self.prosumers.get(event.get("participant"))
            if prosumer is None:
                self.errors += 1
                continue
            try:
                getattr(prosumer, method)(event)
            except ValueError:
                log.exception("%s: bad %s payload", prosumer.spec.id, method)
                prosumer.stats.errors += 1
