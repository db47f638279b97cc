"""The ledger written by a child process (ledger/pipe_writer.py): the same rows as the sink
in this process, and every way the child can fail ends the run with a clear error, never a
hang; what the child was handed whole is written."""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ledger_samples import every_kind, transaction

from ledger import DatasetSink, ledger_digest, read_rows
from ledger.pipe_writer import LedgerPipe, decode, encode
from market.core.records import TABLES, Batch

ROOT = Path(__file__).resolve().parents[2]


def test_frames_carry_every_record_kind_exactly() -> None:
    records = every_kind().records
    assert {type(r) for r in records} == set(TABLES)  # the sample holds every kind
    assert decode(encode(records)) == sorted(
        records, key=lambda r: [c.TABLE for c in map(type, records)].index(r.TABLE)
    )
    with pytest.raises(ValueError, match="no ledger table 'nope'"):
        decode(b"\x91\x92\xa4nope\x90")  # [["nope", []]]


async def test_the_child_writes_what_the_sink_here_writes(tmp_path: Path) -> None:
    here, there = f"sqlite:///{tmp_path}/here.db", f"sqlite:///{tmp_path}/there.db"
    batch = every_kind()
    more = tuple(transaction(i) for i in range(10, 5_010))
    sink = DatasetSink(here)
    await sink.start()
    await sink.write(batch)
    await sink.write(Batch(more))
    await sink.close()
    pipe = LedgerPipe(there)
    await pipe.start()
    await pipe.write(batch.records)
    await pipe.write(more)
    await pipe.close()
    assert ledger_digest(here) == ledger_digest(there)
    for cls in TABLES:
        assert read_rows(here, cls.TABLE) == read_rows(there, cls.TABLE), cls.TABLE


async def test_a_ledger_the_child_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    pipe = LedgerPipe(f"sqlite:///{tmp_path}/file/ledger.db")
    await pipe.start()
    with pytest.raises(RuntimeError, match=r"the ledger writer (failed on|ended).*unable to open database"):
        await pipe.write(every_kind().records)  # queued: the child fails as it opens the ledger
        await pipe.finish()
    await pipe.close()


async def test_a_run_that_writes_nothing_makes_no_ledger(tmp_path: Path) -> None:
    pipe = LedgerPipe(f"sqlite:///{tmp_path}/l.db")
    await pipe.start()
    await pipe.close()  # e.g. the run was refused after the writer started
    assert not (tmp_path / "l.db").exists()


async def test_a_killed_child_fails_the_run_instead_of_hanging_it(tmp_path: Path) -> None:
    pipe = LedgerPipe(f"sqlite:///{tmp_path}/l.db", stall_timeout=10)
    await pipe.start()
    await pipe.write(every_kind().records)
    assert pipe._proc is not None
    os.kill(pipe._proc.pid, signal.SIGKILL)
    await pipe._proc.wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ended before the run did|the ledger writer failed"):
        for i in range(100):  # the first write may still fit in the pipe
            await pipe.write(tuple(transaction(j) for j in range(i * 1000, i * 1000 + 1000)))
        await pipe.finish()
    assert time.monotonic() - t0 < 5
    await pipe.close()  # closing after a failure is quiet


async def test_a_stalled_child_fails_the_run_after_the_stall_timeout(tmp_path: Path) -> None:
    pipe = LedgerPipe(f"sqlite:///{tmp_path}/l.db")
    await pipe.start()
    await pipe.write(every_kind().records)  # open
    pipe.stall_timeout = 0.5
    assert pipe._proc is not None
    os.kill(pipe._proc.pid, signal.SIGSTOP)  # alive, reading nothing
    t0 = time.monotonic()
    chunk = tuple(transaction(j) for j in range(3000))  # ~0.7 MB a frame: the 1 MiB pipe fills
    with pytest.raises(RuntimeError, match=r"took nothing for 0\.5 s"):
        for _ in range(20):
            await pipe.write(chunk)
    assert time.monotonic() - t0 < 5
    assert pipe._proc.returncode is not None  # killed, not left stopped
    await pipe.close()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _child(url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger.pipe_writer", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_a_parent_gone_mid_run_leaves_what_came_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    proc = _child(url)
    whole = encode(every_kind().records)
    cut = _frame(encode([transaction(99)]))[:-3]  # the parent died in the middle of a frame
    out, _ = proc.communicate(_frame(whole) + cut, timeout=30)
    assert proc.returncode == 2
    assert b"ended without its last frame" in out
    assert [r["id"] for r in read_rows(url, "transactions")] == sorted(
        r.id for r in every_kind().records if r.TABLE == "transactions"
    )


def test_a_bad_frame_is_refused_and_written_nowhere(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    proc = _child(url)
    out, _ = proc.communicate(_frame(b"\xc1 not msgpack") + _frame(b""), timeout=30)
    assert proc.returncode == 1
    assert out.startswith(b"error ")
    assert read_rows(url, "transactions") == []


def test_the_child_says_how_to_call_it() -> None:
    done = subprocess.run([sys.executable, "-m", "ledger.pipe_writer"], capture_output=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2 and b"usage: python -m ledger.pipe_writer LEDGER_URL" in done.stderr


def test_a_full_disk_under_the_child_ends_the_run_with_its_error(tmp_path: Path) -> None:
    """The child's files may not grow past 4 MiB (RLIMIT_FSIZE, inherited from the process
    that starts it; SQLite sees a write fail as on a full disk): the run ends with the
    child's error, not a hang, and the ledger keeps the batches committed before, intact."""
    url = f"sqlite:///{tmp_path}/l.db"
    script = f"""
import asyncio, resource, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests" / "ledger")!r}]
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 22, 1 << 22))
from ledger.pipe_writer import LedgerPipe
from ledger_samples import transaction

async def main():
    pipe = LedgerPipe({url!r}, stall_timeout=60)
    await pipe.start()
    try:
        for i in range(100):
            await pipe.write(tuple(transaction(j) for j in range(i * 1000, i * 1000 + 1000)))
        await pipe.finish()
        print("FINISHED")
    except RuntimeError as err:
        print("RAISED", err)
    await pipe.close()

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert "RAISED the ledger writer" in done.stdout and "disk I/O error" in done.stdout, done.stdout + done.stderr
    kept = read_rows(url, "transactions")
    assert 0 < len(kept) < 100_000 and len(kept) % 1000 == 0  # whole frames, nothing torn
    with sqlite3.connect(f"{tmp_path}/l.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
