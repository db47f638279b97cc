"""`microte cosim` start-up faults (issue #18 item 5), each seen on this machine:

- the broker's port was checked alone while HELICS's zmq broker also binds the next port:
  about one run in ten failed with "Unable to bind zmq reply socket";
- a federate that could not start or register left the others (and the broker) waiting
  for it, and the run hung until its 600 s timeout instead of failing at once.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_feeder import morning

pytest.importorskip("helics")

from controller import cosim


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cosim.add_arguments(parser)
    return parser.parse_args(list(argv))


def taken_pair() -> tuple[socket.socket, int]:
    """A port P that is free while P + 1 is held by the returned socket."""
    while True:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
        except OSError:
            holder.close()
            continue
        return holder, port


def test_a_broker_port_comes_with_its_neighbour_free(monkeypatch: pytest.MonkeyPatch) -> None:
    holder, bad = taken_pair()
    with holder:
        offered = iter([bad, bad, 0])
        real = cosim.free_port
        monkeypatch.setattr(cosim, "free_port", lambda: next(offered) or real())
        port = cosim.broker_port()
        assert port != bad
        for p in (port, port + 1):  # both free for the broker
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))


def test_an_explicit_broker_port_whose_neighbour_is_taken_fails_at_once(tmp_path: Path) -> None:
    holder, bad = taken_pair()
    with holder:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=f"port {bad + 1}"):
            cosim.run_all(parse(str(morning(tmp_path)), "--no-weather", "--rounds", "1", "--broker-port", str(bad)))
        assert time.monotonic() - started < 10


async def test_a_federate_that_cannot_register_ends_the_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grid federate exits before it registers (here: a process that fails at once): the
    market federate, already waiting at the broker for it, is stopped, and the run fails in
    seconds naming the grid federate, not when the run's timeout ends."""
    real = cosim.federate_command

    def failing(kind: str, opts: cosim.Options) -> list[str]:
        if kind == "grid":
            return [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]
        return real(kind, opts)

    monkeypatch.setattr(cosim, "federate_command", failing)
    args = parse(str(morning(tmp_path)), "--no-weather", "--rounds", "2", "--ledger", f"sqlite:///{tmp_path}/x.db")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the grid federate failed \(exit 3\)"):
        await asyncio.to_thread(cosim.run_all, args, timeout=120)
    assert time.monotonic() - started < 30
