"""What the market sent each participant privately (`settled`, `delivery`), numbered, so a
participant that reconnects can ask for what it missed (`resume`)."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import msgspec

from market.core.fleet_results import DeliveryRef, SettledRef

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Outbox:
    """Kept as JSON bytes: a few hundred bytes an event instead of a tree of dicts, and
    nothing the garbage collector walks (a day of 1,000 participants left some 200,000
    events, each a few dicts, for every full collection to traverse)."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep  # events kept per participant: bounded memory
        self._seq: dict[str, int] = {}
        # An event is kept as its JSON bytes, or as a reference to the records it was made of
        # (a `/fleet` connection's columnar events), made into its payload when asked for.
        self._sent: dict[str, deque[tuple[int, str, bytes | SettledRef | DeliveryRef]]] = {}

    def push(self, pid: str, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Number the event (`seq`, per participant, from 1) and keep it; returns the payload to send."""
        seq = self._next(pid)
        numbered = {**payload, "seq": seq}
        self._box(pid).append((seq, event, _encode(numbered)))
        return numbered

    def push_ref(self, pid: str, event: str, ref: SettledRef | DeliveryRef) -> int:
        """Number an event sent in columns and keep the reference to its records; its `seq`."""
        seq = self._next(pid)
        self._box(pid).append((seq, event, ref))
        return seq

    def _next(self, pid: str) -> int:
        seq = self._seq[pid] = self._seq.get(pid, 0) + 1
        return seq

    def _box(self, pid: str) -> deque[tuple[int, str, bytes | SettledRef | DeliveryRef]]:
        box = self._sent.get(pid)
        if box is None:
            box = self._sent[pid] = deque(maxlen=self.keep)
        return box

    def since(self, pid: str, seq: int, limit: int = 1 << 30) -> tuple[list[dict[str, Any]], bool]:
        """At most `limit` events after `seq`, oldest first, and whether more follow; raises
        LookupError if some were already dropped."""
        box = self._sent.get(pid, deque())
        if box and seq < box[0][0] - 1:
            raise LookupError(f"events after {seq} are no longer kept (oldest kept: {box[0][0]})")
        start = max(0, seq - box[0][0] + 1) if box else 0  # seqs in a box are contiguous
        page = [
            {"event": e, "data": _decode(d) if isinstance(d, bytes) else {**d.payload(), "seq": seq}}
            for seq, e, d in itertools.islice(box, start, start + limit)
        ]
        return page, start + limit < len(box)
