"""What the market sent each participant privately (`settled`, `delivery`), numbered, so a
participant that reconnects can ask for what it missed (`resume`)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec

from market.core.fleet_results import DeliveryRef, SettledRef

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


# What a kept event holds in memory, estimated (bytes, CPython 3.11; within 2 % of what
# tracemalloc counts for 40 daytime rounds of 1,000 `/fleet` members, docs/benchmarks.md):
# the box's tuple, its seq and the reference, and what the reference keeps alive: a fill,
# or a member's transaction rows.
KEPT_OVERHEAD = 150
SETTLED_BYTES = 350
DELIVERY_BYTES = 250
ROW_BYTES = 150
BUDGET_BYTES = 256 * 2**20


def kept_bytes(data: bytes | SettledRef | DeliveryRef) -> int:
    """The estimated memory of one kept event (what the budget counts)."""
    if isinstance(data, bytes):
        return KEPT_OVERHEAD + len(data)
    if isinstance(data, SettledRef):
        return SETTLED_BYTES
    return DELIVERY_BYTES + ROW_BYTES * len(data.picks)


class Outbox:
    """Kept as JSON bytes: a few hundred bytes an event instead of a tree of dicts, and
    nothing the garbage collector walks (a day of 1,000 participants left some 200,000
    events, each a few dicts, for every full collection to traverse).

    Bounded twice: `keep` events per participant, and `budget` bytes in all (estimated,
    `kept_bytes`), past which the oldest events of the whole outbox go first. Without the
    second bound a 1,000-member community kept ~0.77 MiB a round until each member had 4,096
    events (~2,400 rounds, ~1.8 GiB), and 10,000 members ten times that."""

    def __init__(self, keep: int = 4096, budget: int = BUDGET_BYTES) -> None:
        self.keep = keep  # events kept per participant: bounded memory
        self.budget = budget  # estimated bytes kept in all
        self.bytes = 0  # estimated bytes kept now
        self._seq: dict[str, int] = {}
        # An event is kept as its JSON bytes, or as a reference to the records it was made of
        # (a `/fleet` connection's columnar events), made into its payload when asked for.
        self._sent: dict[str, deque[tuple[int, str, bytes | SettledRef | DeliveryRef]]] = {}
        # Every kept event's participant and seq, oldest first (the budget drops from the
        # left), and entries of events the per-participant bound dropped since (skipped).
        self._order_pid: deque[str] = deque()
        self._order_seq: deque[int] = deque()
        self._live = 0  # events kept now

    def push(self, pid: str, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Number the event (`seq`, per participant, from 1) and keep it; returns the payload to send."""
        numbered = {**payload, "seq": self._seq.get(pid, 0) + 1}
        self._put([(pid, event, _encode(numbered))])
        return numbered

    def push_refs(self, items: Sequence[tuple[str, SettledRef]] | Sequence[tuple[str, DeliveryRef]]) -> list[int]:
        """Number events sent in columns, (participant, reference to its records) each in
        order, and keep the references; their `seq`s."""
        return self._put([(pid, ref.EVENT, ref) for pid, ref in items])

    def _put(self, events: list[tuple[str, str, bytes | SettledRef | DeliveryRef]]) -> list[int]:
        """Number and keep (participant, event, data) each in order, counted in `bytes` and
        in the order, then drop the oldest while over the budget: their `seq`s. In one loop,
        not a call each: a round numbers one per member."""
        seqs, sent, keep, out = self._seq, self._sent, self.keep, []
        added, live = 0, 0
        for pid, event, data in events:
            seq = seqs[pid] = seqs.get(pid, 0) + 1
            box = sent.get(pid)
            if box is None:
                box = sent[pid] = deque(maxlen=keep)
            if len(box) == keep:
                added -= kept_bytes(box[0][2])  # the append drops it (`maxlen`)
            else:
                live += 1
            box.append((seq, event, data))
            added += kept_bytes(data)
            out.append(seq)
        self._order_pid.extend(pid for pid, _, _ in events)
        self._order_seq.extend(out)
        self._live += live
        self.bytes += added
        self._kept()
        return out

    def _kept(self) -> None:
        """After events were put: drop the oldest while over the budget."""
        if self.bytes > self.budget:
            self._drop_oldest()
        if len(self._order_pid) > 2 * self._live + 1024:
            self._compact()

    def _drop_oldest(self) -> None:
        """Drop the oldest events of the whole outbox until it is within its budget (once it
        is full, about as many as were just kept: a round's worth, in one loop)."""
        pids, seqs, sent, size = self._order_pid, self._order_seq, self._sent, kept_bytes
        over, freed, gone = self.bytes - self.budget, 0, 0
        while over > freed and pids:
            pid, seq = pids.popleft(), seqs.popleft()
            box = sent[pid]
            if box and box[0][0] == seq:  # else the per-participant bound dropped it already
                freed += size(box.popleft()[2])
                gone += 1
        self.bytes -= freed
        self._live -= gone

    def _compact(self) -> None:
        """Forget the order's entries of events no longer kept (so it stays within twice the
        events kept, whichever bound dropped them)."""
        sent = self._sent
        order = zip(self._order_pid, self._order_seq, strict=True)
        kept = [(p, q) for p, q in order if (box := sent[p]) and q >= box[0][0]]
        self._order_pid = deque(p for p, _ in kept)
        self._order_seq = deque(q for _, q in kept)

    def since(self, pid: str, seq: int, limit: int = 1 << 30) -> tuple[list[dict[str, Any]], bool]:
        """At most `limit` events after `seq`, oldest first, and whether more follow; raises
        LookupError if some were already dropped."""
        box = self._sent.get(pid, deque())
        first = box[0][0] if box else self._seq.get(pid, 0) + 1  # the oldest kept event's seq
        if seq < first - 1:
            raise LookupError(f"events after {seq} are no longer kept (oldest kept: {first})")
        start = max(0, seq - first + 1)  # seqs in a box are contiguous
        page = [
            {"event": e, "data": _decode(d) if isinstance(d, bytes) else {**d.payload(), "seq": seq}}
            for seq, e, d in itertools.islice(box, start, start + limit)
        ]
        return page, start + limit < len(box)
