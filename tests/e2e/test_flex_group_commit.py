"""/flex group commit (market/flexibility/namespace.py): while one write is in flight the
events that arrive are applied in order and stored together by the next write; a write that
fails undoes its events and every event applied after it, all answered `unavailable`."""

from __future__ import annotations

import asyncio
from typing import Any

from ledger.digest import read_rows
from market.core.records import Batch
from tests.e2e.test_flex import Peer, running, terms


async def test_events_during_a_write_are_stored_together(ledger_url: str) -> None:
    async with running(ledger_url) as (url, server):
        peers = [await Peer(p).connect(url) for p in ("P1", "P2", "P3", "P4")]
        writes: list[Batch] = []
        gate = asyncio.Event()
        write = server.sink.write

        async def slow(batch: Batch) -> None:
            writes.append(batch)
            if len(writes) == 1:
                await gate.wait()  # the first write stays in flight while the others arrive
            await write(batch)

        server.sink.write = slow  # type: ignore[method-assign]
        first = asyncio.ensure_future(peers[0].call("flex.contract.register", terms()))
        await asyncio.sleep(0.2)
        rest = [asyncio.ensure_future(p.call("flex.contract.register", terms())) for p in peers[1:]]
        await asyncio.sleep(0.3)
        assert not first.done() and not any(r.done() for r in rest)  # nobody answered before durable
        gate.set()
        replies = [await first, *[await r for r in rest]]
        assert all(r["ok"] for r in replies)
        assert sorted(r["contract"]["id"] for r in replies) == ["fc1", "fc2", "fc3", "fc4"]
        assert [len(b.records) for b in writes] == [1, 3]  # one write for the three that waited
        server.sink.write = write  # type: ignore[method-assign]
    assert len(read_rows(ledger_url, "flex_contracts")) == 4


async def test_a_failed_write_undoes_its_events_and_those_applied_after_it(ledger_url: str) -> None:
    async with running(ledger_url) as (url, server):
        peers = [await Peer(p).connect(url) for p in ("P1", "P2", "P3", "P4")]
        gate = asyncio.Event()
        write = server.sink.write
        calls = 0

        async def failing_once(batch: Batch) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await gate.wait()
                raise OSError("disk full")
            await write(batch)

        server.sink.write = failing_once  # type: ignore[method-assign]
        first = asyncio.ensure_future(peers[0].call("flex.contract.register", terms()))
        await asyncio.sleep(0.2)
        later = [asyncio.ensure_future(p.call("flex.contract.register", terms())) for p in peers[1:3]]
        await asyncio.sleep(0.3)
        gate.set()
        replies: list[dict[str, Any]] = [await first, *[await r for r in later]]
        # P1's write failed; P2 and P3 were applied on top of it, not stored: all undone
        assert [r["error"]["code"] for r in replies] == ["unavailable"] * 3
        assert calls == 1  # their records were never written
        for p in peers[:3]:
            assert (await p.ok("flex.status", {}))["contract"] is None
        # the next event starts from the state before them: the contract ids are reused
        assert (await peers[3].ok("flex.contract.register", terms()))["contract"]["id"] == "fc1"
        assert (await peers[0].ok("flex.contract.register", terms()))["contract"]["id"] == "fc2"
        server.sink.write = write  # type: ignore[method-assign]
    assert [r["prosumer_id"] for r in read_rows(ledger_url, "flex_contracts")] == ["P4", "P1"]
