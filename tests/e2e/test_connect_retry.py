"""`ParticipantClient.connect(connect_retry=...)`: a transport failure (nothing listening
yet) is retried until the server is up; a refusal by the server fails at once."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import socketio
from aiohttp import web

from ledger import open_sink
from market.core.engine import MarketConfig
from market.server.app import MarketServer
from participants.client import ParticipantClient
from participants.prosumer import Prosumer
from participants.spec import decode_spec
from tests.e2e.conftest import TOKENS, registry, running

CONFIG = MarketConfig(duration=60, round_timeout=0.3)


def prosumer(pid: str) -> Prosumer:
    return Prosumer(decode_spec({"id": pid, "load": {"kind": "synthetic", "annual_kwh": 3000}}), seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving_on(server: MarketServer, port: int) -> AsyncIterator[str]:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_client_started_before_the_server_connects_once_it_is_up(ledger_url: str) -> None:
    port = free_port()
    client = ParticipantClient(prosumer("P1"), reconnection=False)
    connecting = asyncio.create_task(client.connect(f"http://127.0.0.1:{port}", "P1", TOKENS["P1"], connect_retry=15))
    await asyncio.sleep(1.0)  # nothing listens yet: the client must still be trying
    assert not connecting.done(), connecting.exception() if connecting.done() else None
    server = MarketServer(CONFIG, registry(), open_sink(ledger_url))
    async with serving_on(server, port):
        await asyncio.wait_for(connecting, 10)
        assert client.connected and client.refusal is None
        await client.disconnect()


async def test_nothing_listening_is_retried_until_connect_retry_runs_out() -> None:
    client = ParticipantClient(prosumer("P1"), reconnection=False)
    start = time.monotonic()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(f"http://127.0.0.1:{free_port()}", "P1", TOKENS["P1"], connect_retry=1.0)
    assert time.monotonic() - start >= 0.9  # it kept trying for about connect_retry
    assert client.refusal is None  # a transport failure is not the server's refusal


async def test_a_refused_login_fails_at_once_despite_connect_retry(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        client = ParticipantClient(prosumer("P1"), reconnection=False)
        start = time.monotonic()
        with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized: unknown id or wrong token"):
            await client.connect(url, "P1", "wrong", connect_retry=15)
        assert time.monotonic() - start < 3
        assert client.refusal is not None and client.refusal.startswith("unauthorized")


async def test_microte_participant_started_before_the_market_connects_once_it_is_up(tmp_path: Path) -> None:
    """`microte participant --connect-retry`: the command started first waits for the
    market instead of failing, and trades once the market listens."""
    port = free_port()
    scenario = tmp_path / "s.toml"
    scenario.write_text('[[participants]]\nid = "P1"\nload = { kind = "synthetic", annual_kwh = 3000 }\n')
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[participants]]\nid = "P1"\ntoken = "{TOKENS["P1"]}"\n')
    cmd = [sys.executable, "-m", "controller", "participant", "--url", f"http://127.0.0.1:{port}"]
    cmd += ["--scenario", str(scenario), "--registry", str(tokens), "--connect-retry", "20"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(2.0)  # nothing listens yet: the command must still be trying
        assert proc.returncode is None
        server = MarketServer(CONFIG, registry(), open_sink(f"sqlite:///{tmp_path / 'p.db'}"))
        async with serving_on(server, port):
            deadline = time.monotonic() + 15
            while "P1" not in server.online() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert "P1" in server.online()
            proc.send_signal(signal.SIGTERM)
            out, _err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0 and b"P1: rounds=" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
