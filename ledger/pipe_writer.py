"""A ledger written by a child process while an in-process run steps (`--transport inproc`).

In one process the rounds and the database inserts share one interpreter lock: a write of
50,000 records stopped the rounds for ~0.1 s, and a write thread running beside them
slowed them as much. `LedgerPipe` hands the records, encoded (msgpack, a C call per
chunk), to `python -m ledger.pipe_writer URL`, which decodes them and writes them through
the URL's own sink on the machine's other core: the same records, in the same order and
batches of whole chunks, so the same ledger (the digest tests compare it).

The wire between the two: frames of a 4-byte big-endian length and a msgpack body, a list
of `[table, records of that table]` pairs; a frame of length 0 ends the run. The child
answers on its stdout: `ready` once loaded (the parent builds its run meanwhile), `open`
once the first frame is written (the ledger is made then), `ok RECORDS` once everything is
durable, or `error MESSAGE` (exit code 1; 2 if the parent went away mid-run). Its logs go
to the inherited stderr.

Bounds: the parent queues at most `QUEUE_FRAMES` frames for the thread that writes them to
the pipe (its `write` waits while they are queued), the pipe holds `PIPE_BYTES`, the child
at most `QUEUE_FRAMES` frames it has not written (and merges what queued into one commit
of at most `MERGE_RECORDS`); a child that takes nothing for `stall_timeout` seconds fails
the run with a clear error rather than hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import queue
import struct
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ledger.batch_rows import group
from market.core.records import TABLES, Batch, Record

PIPE_BYTES = 1 << 20  # the pipe's capacity, which frames stay below (controller/inproc.py PIPE_EVERY)
QUEUE_FRAMES = 8  # frames queued and not yet in the pipe (parent) or not yet written (child)
MERGE_RECORDS = 50_000  # queued frames merged into one commit, up to this many records
STALL_TIMEOUT = 120.0  # seconds without progress before the parent gives up on the child
_HEAD = struct.Struct(">I")
_TYPES: dict[str, type[Record]] = {cls.TABLE: cls for cls in TABLES}
_ENCODER = msgspec.msgpack.Encoder()
_FRAME = msgspec.msgpack.Decoder(list[tuple[str, msgspec.Raw]])
_DECODERS = {name: msgspec.msgpack.Decoder(list[cls]) for name, cls in _TYPES.items()}  # type: ignore[valid-type]


def encode(records: Sequence[Record]) -> bytes:
    """One frame's body: the records grouped by table as the database writers group a batch
    (tables in first-seen order, records in their order within a table)."""
    groups = group([Batch(tuple(records))])
    return _ENCODER.encode([(t, msgspec.Raw(_ENCODER.encode(rs))) for t, rs in groups])


def decode(body: bytes) -> list[Record]:
    out: list[Record] = []
    for table, raw in _FRAME.decode(body):
        decoder = _DECODERS.get(table)
        if decoder is None:
            raise ValueError(f"no ledger table {table!r}")
        out += decoder.decode(raw)
    return out


class LedgerPipe:
    """The parent's end: `start`, `write` records in order, `finish` (durable once it
    returns), `close` (the child has exited).

    Frames go to the pipe from a thread of its own (`_pump`, blocking writes that release
    the interpreter lock), so the run steps on while the child loads, opens the ledger and
    catches up; `write` waits only when `QUEUE_FRAMES` frames are queued here."""

    def __init__(self, url: str, *, stall_timeout: float = STALL_TIMEOUT) -> None:
        self.url = url
        self.stall_timeout = stall_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._frames: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_FRAMES)
        self._pump: threading.Thread | None = None
        self._pump_error: OSError | None = None  # the child's end closed under the pump
        self._finished = False  # `finish` succeeded: everything written is durable
        self._failed: str | None = None  # why the child stopped before that, if it did

    async def start(self) -> None:
        """Start the writer; it loads while the caller prepares its run, and makes the
        ledger on the first frame (a run refused before it writes makes none)."""
        read_end, write_end = os.pipe()
        _widen(write_end)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ledger.pipe_writer",
                self.url,
                stdin=read_end,
                stdout=asyncio.subprocess.PIPE,
                env=_child_env(),
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._pump = threading.Thread(target=self._pump_frames, args=(write_end,), name="ledger-pipe", daemon=True)
        self._pump.start()

    def _pump_frames(self, fd: int) -> None:
        """The pump thread: each queued frame into the pipe, in order, until the end (None)."""
        try:
            while (frame := self._frames.get()) is not None:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as err:  # the child went away: the loop side reports it
            self._pump_error = err
            os.close(fd)
            while self._frames.get() is not None:
                pass  # taken and dropped, so that no `write` waits on a full queue for nothing
            return
        os.close(fd)

    async def write(self, records: Sequence[Record]) -> None:
        """Hand `records` to the writer: returns once they are queued (not yet durable)."""
        if records:
            await self._put(_frame(encode(records)))

    async def finish(self) -> None:
        """Return once every record written is durable; a failure of the writer is raised here."""
        if self._failed is not None:
            raise RuntimeError(f"the ledger writer failed earlier: {self._failed}")
        if self._proc is None or self._finished:
            return
        await self._put(_frame(b""))
        await self._put(None)
        pump = self._pump
        assert pump is not None
        await asyncio.get_running_loop().run_in_executor(None, pump.join, self.stall_timeout)
        if pump.is_alive():
            raise await self._fail(self._stalled())
        status = await self._status()
        if status == "ready":
            status = await self._status()
        if status == "open":
            status = await self._status()
        if self._pump_error is not None or not status.startswith("ok"):
            raise await self._fail(f"the ledger writer failed on {self.url}: {status}")
        self._finished = True

    async def close(self) -> None:
        """`finish`, then wait for the writer to exit (it closes its ledger first). Quiet
        after a failure that was raised already."""
        try:
            if self._failed is None:
                await self.finish()
        finally:
            await self._stop()

    async def _put(self, frame: bytes | None) -> None:
        if self._failed is not None or self._finished:
            raise RuntimeError(f"the ledger writer takes nothing more: {self._failed or 'the run has finished'}")
        if self._pump_error is not None:
            raise await self._fail(f"the ledger writer ended before the run did ({await self._last_word()})")
        try:
            self._frames.put_nowait(frame)
            return
        except queue.Full:
            pass
        put = functools.partial(self._frames.put, frame, timeout=self.stall_timeout)
        try:
            await asyncio.get_running_loop().run_in_executor(None, put)
        except queue.Full:
            raise await self._fail(self._stalled()) from None
        if self._pump_error is not None:
            raise await self._fail(f"the ledger writer ended before the run did ({await self._last_word()})")

    def _stalled(self) -> str:
        return (
            f"the ledger writer took nothing for {self.stall_timeout:g} s (is {self.url} stalled?); "
            "the run stopped, the ledger holds what was written before"
        )

    async def _fail(self, message: str) -> RuntimeError:
        self._failed = message
        await self._stop()
        return RuntimeError(message)

    async def _last_word(self) -> str:
        """What the writer said last before it went (an `error`, if it said one)."""
        word = "nothing"
        while not (status := await self._status()).startswith("ended with"):
            word = status
        return word if word.startswith("error") else status

    async def _status(self) -> str:
        """The writer's next status line (its end of stdout reads as its exit code)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.stall_timeout)
        except TimeoutError:
            return f"ended with no answer in {self.stall_timeout:g} s"
        text = line.decode(errors="replace").strip()
        if text:
            return text
        return f"ended with exit code {await proc.wait()}"

    async def _stop(self) -> int | None:
        """Make sure the child and the pump are gone; the child's exit code."""
        proc = self._proc
        if proc is None:
            return None
        if not self._finished and self._failed is None:
            self._failed = "it was stopped before the run's end"
        if proc.returncode is None and self._failed is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.stall_timeout)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        pump = self._pump
        if pump is not None and pump.is_alive():  # unblocked: the pipe's reader is gone
            loop = asyncio.get_running_loop()
            with contextlib.suppress(queue.Full):  # room is made: a pump whose pipe broke drops what is queued
                await loop.run_in_executor(None, functools.partial(self._frames.put, None, timeout=self.stall_timeout))
            await loop.run_in_executor(None, pump.join, self.stall_timeout)
        return proc.returncode


def _frame(body: bytes) -> bytes:
    return _HEAD.pack(len(body)) + body


def _child_env() -> dict[str, str]:
    """This environment, with the checkout this module is in first on the child's path (the
    project need not be installed to run `microte sim`)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join((root, path))}


def _widen(fd: int) -> None:
    """Linux: a pipe of `PIPE_BYTES` (64 KiB by default), so a whole frame goes in at once
    while the child is not behind; else the parent waits for each 64 KiB the child reads."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default size is kept
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


# -- the child ---------------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None for the last frame (`IncompleteReadError` at an early end)."""
    (n,) = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    return await reader.readexactly(n) if n else None


async def _serve(url: str) -> int:
    from ledger import open_sink  # the database libraries: in the child only

    print("ready", flush=True)  # loaded: the parent builds its run meanwhile
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    try:
        first = await _read_frame(reader)
    except asyncio.IncompleteReadError:
        print("error the run ended before its first frame", flush=True)
        return 2
    if first is None:
        print("ok 0", flush=True)  # nothing to write: no ledger made
        return 0
    sink = open_sink(url)  # opened (made) on the first frame: a run refused before it makes none
    try:
        await sink.start()
        records = decode(first)
        await sink.write(Batch(tuple(records)))
    except Exception as err:
        print(f"error {type(err).__name__}: {err}", flush=True)
        with contextlib.suppress(Exception):
            await sink.close()
        return 1
    print("open", flush=True)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_FRAMES)
    ended = False

    async def receive() -> None:
        nonlocal ended
        try:
            while (body := await _read_frame(reader)) is not None:
                await queue.put(body)
            ended = True
        except asyncio.IncompleteReadError:
            return  # the parent went away mid-run: what came whole is written
        finally:
            await queue.put(None)

    written = len(records)
    receiving = asyncio.create_task(receive())
    try:
        while (body := await queue.get()) is not None:
            records = decode(body)
            while len(records) < MERGE_RECORDS and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    queue.put_nowait(None)
                    break
                records += decode(more)
            await sink.write(Batch(tuple(records)))
            written += len(records)
        await receiving
    except Exception as err:
        receiving.cancel()
        print(f"error {type(err).__name__}: {err}", flush=True)
        with contextlib.suppress(Exception):
            await sink.close()
        return 1
    if not ended:
        print(f"error the run ended without its last frame; {written} records written", flush=True)
        await sink.close()
        return 2
    print(f"ok {written}", flush=True)  # every write has committed: durable before the sink closes
    await sink.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(
            "usage: python -m ledger.pipe_writer LEDGER_URL (frames on stdin: ledger/pipe_writer.py)", file=sys.stderr
        )
        return 2
    return asyncio.run(_serve(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
