"""Hostile-mix soak: honest prosumers trade on an rt market (2 s slots) while a hostile
process floods it for `--seconds`: idle websockets that never log in, engine.io polling
handshakes, a slow reader asking `resume` without reading, `orders` batch floods from an
authenticated prosumer, binary frames, bad logins; and the server is killed (-9) and
restarted once half-way. Reports the server's peak RSS, the honest participants'
acknowledgement p50/p99 (outside the restart), and checks the ledger is complete.

    python bench/hostile_soak.py [--seconds 60] [--honest 20] [--processes 2] [--attacks idle,batch,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from tests.e2e.test_crash import free_port
from tests.e2e.test_observe import scrape
from tests.e2e.test_soak import check_ledger, start_market, start_worker

HOSTILE = "H0"  # an authenticated prosumer that misbehaves
# The hostile process connects from its own loopback address, as an attacker on the internet
# would: the honest prosumers (127.0.0.1) are not the address that backs off.
HOSTILE_ADDRESS = "127.0.0.2"


async def server_ack_p99(url: str) -> float:
    """The p99 of the server's own acknowledgement latency (event received to reply sent),
    from its histogram: the upper bound of the bucket that holds the 99th percentile (ms)."""
    async with aiohttp.ClientSession() as http:
        samples = await scrape(http, url)
    buckets = [(float(s.labels["le"]), s.value) for s in samples.get("microte_ack_latency_seconds_bucket", [])]
    total = buckets[-1][1] if buckets else 0.0
    return next((le * 1000 for le, n in buckets if n >= 0.99 * total), float("nan"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


ATTACKS = ("idle", "polling", "resume", "batch", "binary", "logins")


async def hostile(url: str, token: str, seconds: float, attacks: tuple[str, ...] = ATTACKS) -> None:
    """Every kind of abuse at once, for `seconds` (run in its own process)."""
    ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(HOSTILE_ADDRESS, 0))) as http:

        async def idle() -> None:
            held: list[aiohttp.ClientWebSocketResponse] = []
            while time.monotonic() < end:
                try:
                    held.append(await http.ws_connect(ws_url))
                except Exception:
                    await asyncio.sleep(0.5)
                held = held[-1500:]
                await asyncio.sleep(0.005)

        async def polling() -> None:
            while time.monotonic() < end:
                try:
                    async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                        await r.read()
                except Exception:
                    await asyncio.sleep(0.5)

        async def authed(frames: list[str | bytes], pause: float) -> None:
            while time.monotonic() < end:
                try:
                    ws = await http.ws_connect(ws_url)
                    await ws.receive()
                    await ws.send_str("40/market," + json.dumps({"id": HOSTILE, "token": token}))
                    await ws.receive()
                    while time.monotonic() < end:
                        for f in frames:
                            await (ws.send_bytes(f) if isinstance(f, bytes) else ws.send_str(f))
                        await asyncio.sleep(pause)  # never reads
                except Exception:
                    await asyncio.sleep(0.5)

        slot = (int(time.time()) // 2 + 100) * 2
        orders = [{"side": "bid", "quantity": 1, "price": 0.01, "time_delivery": [slot, slot + 2]}] * 1000
        batch = '42/market,["orders",' + json.dumps({"orders": orders}) + "]"

        async def bad_logins() -> None:
            while time.monotonic() < end:
                try:
                    ws = await http.ws_connect(ws_url)
                    await ws.receive()
                    await ws.send_str("40/market," + json.dumps({"id": "P0", "token": "guess"}))
                    await ws.close()
                except aiohttp.WSServerHandshakeError:
                    continue  # refused at the handshake (backing off): a hostile client keeps trying
                except Exception:
                    await asyncio.sleep(0.5)

        runs = {
            "idle": idle,
            "polling": polling,
            "resume": lambda: authed(['42/market,1["resume",{"since":0}]'], 0.001),
            "batch": lambda: authed([batch], 0.01),
            "binary": lambda: authed(['451-/market,["bid",{"_placeholder":true,"num":0}]', b"\x00" * 65536], 0.01),
            "logins": bad_logins,
        }
        await asyncio.gather(*(runs[a]() for a in attacks))


async def soak(seconds: float, honest: int, processes: int, attacks: tuple[str, ...]) -> dict[str, float]:
    tokens = {f"P{i}": f"tok-{i}" for i in range(honest)} | {HOSTILE: "tok-h"}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ledger, port = f"sqlite:///{tmp}/hostile.db", free_port()
        url = f"http://127.0.0.1:{port}"
        server = await start_market(tmp, ledger, port, tokens)
        ids = [p for p in tokens if p != HOSTILE]
        groups = [ids[k::processes] for k in range(processes)]
        outs = [tmp / f"acked-{k}.txt" for k in range(processes)]
        workers = [await start_worker(url, g, o, tokens) for g, o in zip(groups, outs, strict=True)]
        await asyncio.sleep(6)
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--attack", url, "--seconds", str(seconds), "--attacks", ",".join(attacks)
        )
        peak, t0 = 0.0, time.monotonic()
        restart_at = t0 + seconds / 2
        restarted, killed, back = False, 0.0, 0.0
        try:
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(0.5)
                if server.returncode is None:
                    peak = max(peak, rss_mb(server.pid))
                if not restarted and time.monotonic() >= restart_at:
                    restarted, killed = True, time.time()
                    server.send_signal(signal.SIGKILL)
                    await server.wait()
                    server = await start_market(tmp, ledger, port, tokens)
                    back = time.time()
            await attacker.wait()
            server_ack = await server_ack_p99(url)  # the restarted server's, all its acks
            await asyncio.sleep(6)  # honest trading after the attack
        finally:
            for w in (*workers, attacker):
                if w.returncode is None:
                    w.kill()
                    await w.wait()
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 15)
        acks = [
            (float(f[1]), float(f[2]))
            for o in outs
            for line in o.read_text().splitlines()
            if len(f := line.split()) == 3
        ]
        report = check_ledger(ledger, outs)
    # Bids sent from the kill until 4 s (two slots) after the restarted server listens wait
    # for it to come back: reported apart, as the restart's own figure.
    steady = sorted(ms for ms, sent in acks if not killed - 5 <= sent <= back + 4)
    around = sorted(ms for ms, sent in acks if killed - 5 <= sent <= back + 4)
    return {
        "peak_rss_mb": peak,
        "p50_ms": steady[len(steady) // 2],
        "p99_ms": steady[int(len(steady) * 0.99)],
        "acks": len(steady),
        "server_p99_ms": server_ack,
        "restart_max_ms": max(around, default=0.0),
        "restart_acks": len(around),
        **report,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--honest", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    ap.add_argument("--attack", help=argparse.SUPPRESS)  # internal: the hostile process
    a = ap.parse_args()
    attacks = tuple(x for x in a.attacks.split(",") if x)
    if unknown := set(attacks) - set(ATTACKS):
        ap.error(f"unknown attacks {sorted(unknown)}")
    if a.attack:
        asyncio.run(hostile(a.attack, "tok-h", a.seconds, attacks))
        return
    r = asyncio.run(soak(a.seconds, a.honest, a.processes, attacks))
    print(
        f"hostile soak {a.seconds:.0f} s ({','.join(attacks) or 'no attack'}), {a.honest} honest prosumers "
        f"in {a.processes} processes: ledger complete"
    )
    print(
        "| server peak RSS (MB) | honest ack p50 (ms) | honest ack p99 (ms) | acks "
        "| server-side ack p99, all clients (ms, bucket bound) | around the restart: acks, max (ms) "
        "| filled slots | processed late |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cells = [
        f"{r['peak_rss_mb']:.0f}",
        f"{r['p50_ms']:.1f}",
        f"{r['p99_ms']:.1f}",
        r["acks"],
        f"<= {r['server_p99_ms']:g}",
        f"{r['restart_acks']}, {r['restart_max_ms']:.0f}",
        r["filled"],
        r["late"],
    ]
    print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
