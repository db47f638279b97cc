"""Group commit: acknowledged actions become durable together, one write in flight at a time.

Every caller of `commit(records)` returns only once its own records are durable (or raises
the write's error, for it to undo its action): records that arrive while a write is in
flight go into the next one, so an acknowledgement waits for at most one write in flight
plus its own, however many clients send at once. `drain()` waits until nothing is pending
or in flight (a round opens only then, so no entry whose write may still fail is cleared).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from market.core.records import Batch, Record

Undo = Callable[[], None]


class GroupCommit:
    def __init__(self, write: Callable[[Batch], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[Record] = []
        self._waiters: list[tuple[asyncio.Future[None], Undo | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.writes = 0  # batches written
        self.last_write_s = 0.0  # duration of the last write (for /metrics)
        self.write_s_total = 0.0  # time spent writing, all writes

    @property
    def depth(self) -> int:
        """Records waiting for the next write."""
        return len(self._pending)

    async def commit(self, records: Sequence[Record], undo: Undo | None = None) -> None:
        """Return once `records` are durable. If their write fails, `undo` runs at once (before
        any other task can see the state) and the write's error is raised."""
        if not records:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.extend(records)
        self._waiters.append((fut, undo))
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        # A cancelled caller cancels only its own future: the write goes on for the others
        # (and for it: its records may be stored; its undo still runs if the write fails).
        await fut

    async def _run(self) -> None:
        try:
            while self._pending:
                records, waiters = self._pending, self._waiters
                self._pending, self._waiters = [], []
                t0 = time.perf_counter()
                try:
                    await self._write(Batch(tuple(records)))
                except BaseException as err:  # each caller's action is undone, then it hears why
                    for w, undo in waiters:
                        if undo is not None:
                            undo()
                        if not w.done():
                            w.set_exception(err if isinstance(err, Exception) else RuntimeError("write cancelled"))
                    if not isinstance(err, Exception):
                        raise
                else:
                    for w, _ in waiters:
                        if not w.done():
                            w.set_result(None)
                finally:
                    self.writes += 1
                    self.last_write_s = time.perf_counter() - t0
                    self.write_s_total += self.last_write_s
        finally:
            self._task = None
            if not self._pending:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until nothing is pending or in flight; on return (before the caller's next
        await) no commit is outstanding."""
        while not self._idle.is_set():
            await self._idle.wait()
