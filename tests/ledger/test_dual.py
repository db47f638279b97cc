"""The chain ledger (DualSink, `microte ledger verify`) on real SQLite files and a real
in-process EVM (eth-tester over py-evm): the database first, one anchor transaction per
round, token balances equal to the ledger's money, tampering detected and named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from ledger_samples import T0, every_kind, transaction
from web3.exceptions import TimeExhausted

from controller import cli, ledger_cmd
from controller.sim import run_sim
from ledger import DatasetSink, ledger_digest, merkle, open_sink, read_rows
from ledger.dual import DualSink, parse_url
from ledger.evm import CLEARING_ADDRESS, ChainError, EvmAnchor, money_deltas, net_transfers, participant_address
from market.core.records import GRID_ID, Batch, MeterRecord, Record, RoundRecord, Transaction, amount

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"
PEOPLE = ("H01", "H02", "H03", "Hé-4")


def round_batch(i: int, *, extra: tuple[Record, ...] = ()) -> Batch:
    """One round's records as MarketServer._finish writes them: trades, readings, a RoundRecord."""
    t = T0 + 900 * i
    records: list[Record] = []
    for j, seller in enumerate(PEOPLE):
        buyer = PEOPLE[(j + 1 + i) % len(PEOPLE)]
        q = 100 + 37 * i + 11 * j
        price = 0.05 + 0.01 * j
        records.append(
            Transaction(
                id=f"t{t}-{j}",
                kind="p2p",
                time_delivery_start=t,
                time_delivery_end=t + 900,
                seller_id=seller,
                buyer_id=buyer,
                energy_source="solar",
                quantity=q,
                price_buy=price + 0.002,  # a spread: stays with the clearing account
                price_sell=price,
                amount_buy=amount(q, price + 0.002),
                amount_sell=amount(q, price),
                commit_id=f"c{t}-{j}",
                time_creation=t + 900,
            )
        )
        records.append(
            MeterRecord(
                id=f"m{t}/{seller}",
                participant_id=seller,
                time_interval_start=t,
                time_interval_end=t + 900,
                generation='{"solar":500}',
                consumption='{"bess":{},"other":{"external":80}}',
                time_creation=t + 900,
            )
        )
    records.append(
        Transaction(
            id=f"t{t}-grid",
            kind="grid_buy",
            time_delivery_start=t,
            time_delivery_end=t + 900,
            seller_id=GRID_ID,
            buyer_id=PEOPLE[i % len(PEOPLE)],
            energy_source=GRID_ID,
            quantity=80,
            price_buy=0.25,
            price_sell=0.25,
            amount_buy=amount(80, 0.25),
            amount_sell=amount(80, 0.25),
            commit_id=None,
            time_creation=t + 900,
        )
    )
    records.extend(extra)
    summary = RoundRecord(
        id=f"r{t}-{t - 900}",
        time=t,
        duration=900,
        current_round_start=t - 900,
        matched_slot_start=t + 900,
        trades=len(PEOPLE),
        metered=len(PEOPLE),
        missing="[]",
        records=len(records),
    )
    return Batch((*records, summary))


def dual_url(tmp_path: Path, name: str = "ledger.db") -> str:
    return f"evm+sqlite:///{tmp_path / name}"


def fast(sink: Any) -> DualSink:
    assert isinstance(sink, DualSink)
    sink.retry_attempts = 3
    sink.retry_wait_max = 0.02
    return sink


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[DualSink]:
    s = fast(open_sink(dual_url(tmp_path)))
    await s.start()
    yield s
    await s.close()


def chain_of(sink: DualSink) -> EvmAnchor:
    assert sink.chain is not None
    return sink.chain


def head(chain: EvmAnchor) -> int:
    return int(chain.w3.eth.get_block("latest")["number"])


def txs_after(chain: EvmAnchor, block: int) -> list[int]:
    return [len(chain.w3.eth.get_block(n)["transactions"]) for n in range(block + 1, head(chain) + 1)]


def db_file(url: str) -> str:
    return str(sa.make_url(parse_url(url).db_url if url.startswith("evm+") else url).database)


def tamper(url: str, sql: str, *params: Any) -> None:
    with sqlite3.connect(db_file(url)) as conn:
        assert conn.execute(sql, params).rowcount == 1
    conn.close()


def verify_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["ledger", "verify", *argv])
    return code, capsys.readouterr().out


# -- one transaction per round, the roots, the tokens --------------------------------------------


async def test_one_anchor_transaction_per_round_and_none_between(sink: DualSink, tmp_path: Path) -> None:
    chain = chain_of(sink)
    start = head(chain)
    # Acknowledged orders/readings between rounds (durability "ack"): durable, not anchored yet.
    for i in range(5):
        await sink.write(Batch((transaction(i),)))
    assert txs_after(chain, start) == []
    assert len(read_rows(dual_url(tmp_path), "transactions")) == 5
    for i in range(1, 4):
        await sink.write(round_batch(i))
    # three rounds: three blocks with one transaction each (the anchor with its settlement)
    assert txs_after(chain, start) == [1, 1, 1]
    assert chain.anchor_count() == 3 == sink.anchored
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        rows = conn.execute(
            "SELECT seq, label, records, status, chain_index FROM chain_anchors ORDER BY seq"
        ).fetchall()
    labels = [f"r{T0 + 900 * i}-{T0 + 900 * i - 900}" for i in (1, 2, 3)]
    records = [5 + len(round_batch(1)), len(round_batch(2)), len(round_batch(3))]  # the first takes the 5 between
    assert rows == [(i, labels[i], records[i], "anchored", i) for i in range(3)]


async def test_roots_on_chain_are_the_roots_of_the_rows(sink: DualSink, tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    batches = [round_batch(i) for i in range(1, 4)]
    for b in batches:
        await sink.write(b)
    chain = chain_of(sink)
    for index, batch in enumerate(batches):
        # recomputed independently: the records' own rows, as written
        leaves = merkle.sorted_leaves(
            (r.TABLE, str(r.row()["id"]), merkle.record_leaf(r.TABLE, r.row())) for r in batch.records
        )
        expected = merkle.root([leaf for *_, leaf in leaves])
        on_chain = chain.get_anchor(index)
        assert on_chain.root == expected
        assert (on_chain.interval_start, on_chain.interval_end) == (T0 + 900 * (index + 1), T0 + 900 * (index + 2))
        assert on_chain.records == len(batch)
    assert ledger_cmd.verify(url).ok


async def test_token_balances_equal_the_ledger_money(sink: DualSink, tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    await sink.write(every_kind())  # transactions, LEM token transfers, flexibility tokens
    for i in range(1, 6):
        await sink.write(round_batch(i))
    chain = chain_of(sink)
    rows = [(t, r) for t in ("transactions", "token_transfers", "flex_tokens") for r in read_rows(url, t)]
    net = money_deltas(rows)
    assert set(net) >= {*PEOPLE, GRID_ID, "P1", "Pé-2", "AGG", ""}
    for pid, money in net.items():
        assert chain.position(participant_address(pid) if pid else CLEARING_ADDRESS) == money, pid
    assert net[""] > 0  # the spreads
    assert sum(net.values()) == 0
    # every payer drew credit for what it paid: the token supply is the credit drawn
    supply = chain.contract.functions.totalSupply().call()
    assert supply == sum(chain.credit(participant_address(p)) for p in net if p) + chain.credit(CLEARING_ADDRESS)


# -- verify: OK, tampered rows named, inclusion proofs ----------------------------------------------


async def test_verify_detects_and_names_a_tampered_row(
    sink: DualSink, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = dual_url(tmp_path)
    for i in range(1, 4):
        await sink.write(round_batch(i))
    await sink.close()
    code, out = verify_cli([url], capsys)
    assert code == 0, out
    assert out.count("\nOK ") == 3 and "OK: 3 anchors" in out

    victim = f"t{T0 + 1800}-2"  # a trade of the second round
    tamper(url, "UPDATE transactions SET amount_buy = amount_buy - 1000 WHERE id = ?", victim)
    report = ledger_cmd.verify(url)
    assert not report.ok
    assert report.tampered == [("transactions", victim)]
    assert [a.ok for a in report.anchors] == [True, False, True]
    code, out = verify_cli([url], capsys)
    assert code == 1
    assert f"transactions {victim}: row changed since it was anchored" in out
    assert f"tampered rows: transactions {victim}" in out
    assert "token position of" in out  # the chain's money no longer matches the row either


async def test_verify_names_deleted_inserted_and_lost_anchor_rows(sink: DualSink, tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    for i in range(1, 4):
        await sink.write(round_batch(i))
    await sink.close()
    tamper(url, "DELETE FROM meters WHERE id = ?", f"m{T0 + 900}/H02")
    tamper(
        url,
        "INSERT INTO meters SELECT 'm-forged', participant_id, time_interval_start, time_interval_end, generation,"
        " consumption, time_creation FROM meters WHERE id = ?",
        f"m{T0 + 2700}/H01",
    )
    tamper(url, "DELETE FROM chain_anchors WHERE seq = 2")
    report = ledger_cmd.verify(url)
    assert report.tampered == [("meters", f"m{T0 + 900}/H02")]
    assert report.unanchored == [("meters", "m-forged")]
    assert any("anchor #2 on chain" in p and "missing from the anchors table" in p for p in report.problems)
    text = ledger_cmd.render(report)
    assert f"meters m{T0 + 900}/H02: anchored row deleted" in text
    assert "UNANCHORED meters m-forged" in text


async def test_verify_detects_a_row_changed_with_its_recorded_leaf(sink: DualSink, tmp_path: Path) -> None:
    """Rewriting the row and its leaf in chain_leaves: the leaves no longer give the root."""
    url = dual_url(tmp_path)
    await sink.write(round_batch(1))
    await sink.close()
    victim = f"t{T0 + 900}-1"
    tamper(url, "UPDATE transactions SET quantity = 1 WHERE id = ?", victim)
    row = next(r for r in read_rows(url, "transactions") if r["id"] == victim)
    tamper(url, "UPDATE chain_leaves SET leaf = ? WHERE key = ?", merkle.record_leaf("transactions", row).hex(), victim)
    report = ledger_cmd.verify(url)
    (anchor,) = report.anchors
    assert not anchor.ok
    assert any("chain_leaves altered" in p for p in anchor.problems)
    assert any("!= root on chain" in p for p in anchor.problems)


async def test_inclusion_proof_of_a_record(sink: DualSink, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = dual_url(tmp_path)
    for i in range(1, 3):
        await sink.write(round_batch(i))
    chain = chain_of(sink)
    root = chain.get_anchor(1).root
    await sink.close()
    record = f"m{T0 + 1800}/H03"
    code, out = verify_cli([url, "--record", record], capsys)
    assert code == 0, out
    proof = json.loads(out)
    assert proof["verified"] is True
    assert proof["record"]["table"] == "meters" and proof["record"]["row"]["participant_id"] == "H03"
    assert proof["anchor"]["index"] == 1 and proof["chain_root"] == "0x" + root.hex()
    # checked by hand, from the JSON alone
    leaf = merkle.leaf_hash(proof["leaf_data"].encode())
    assert "0x" + leaf.hex() == proof["leaf"] == proof["anchored_leaf"]
    path = [(p["side"], bytes.fromhex(p["hash"][2:])) for p in proof["proof"]]
    assert merkle.verify(leaf, path, root)
    # a record whose id is in no table, and one that is not anchored yet
    code, _ = verify_cli([url, "--record", "no-such-id"], capsys)
    assert code == 2
    tamper(url, "UPDATE meters SET generation = '{\"solar\":9999}' WHERE id = ?", record)
    code, out = verify_cli([url, "--record", record], capsys)
    assert code == 1 and json.loads(out)["verified"] is False


# -- the database first, retries, no duplicates, recovery --------------------------------------------


class Outage:
    """The chain's node unreachable: every JSON-RPC request fails to connect."""

    def __init__(self, chain: EvmAnchor) -> None:
        self.provider = chain.w3.provider
        self.original: Callable[..., Any] = self.provider.make_request
        self.calls = 0

    def __enter__(self) -> Outage:
        def down(method: str, params: Any) -> Any:
            self.calls += 1
            raise ConnectionError(f"node unreachable ({method})")

        self._set(down)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._set(self.original)

    def _set(self, fn: Callable[..., Any]) -> None:
        self.provider.make_request = fn  # type: ignore[method-assign]
        self.provider._request_func_cache = (None, None)  # web3 caches the bound method


async def test_chain_down_write_raises_after_retries_but_rows_are_durable(sink: DualSink, tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    chain = chain_of(sink)
    start = head(chain)
    batch = round_batch(1)
    with Outage(chain) as outage, pytest.raises(ConnectionError):
        await sink.write(batch)
    assert outage.calls >= sink.retry_attempts  # retried, then gave up
    assert sink.retries == sink.retry_attempts - 1
    # not acknowledged, but durable in the database, with its anchor written ahead
    assert len(read_rows(url, "transactions")) == len(PEOPLE) + 1
    assert len(read_rows(url, "rounds")) == 1
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("SELECT status FROM chain_anchors").fetchall() == [("pending",)]
    assert txs_after(chain, start) == []
    report = ledger_cmd.verify(url)
    assert not report.ok and "pending" in report.anchors[0].problems[0]

    # The node is back: the market retries the round (same records) and goes on.
    await sink.write(batch)  # a retried write: stored once, anchored once
    await sink.write(round_batch(2))
    assert txs_after(chain, start) == [1, 1]
    assert chain.anchor_count() == 2
    assert len(read_rows(url, "transactions")) == 2 * (len(PEOPLE) + 1)
    await sink.close()
    assert ledger_cmd.verify(url).ok


async def test_a_lost_receipt_is_retried_without_a_second_transaction(
    sink: DualSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = chain_of(sink)
    real = chain.w3.eth.wait_for_transaction_receipt
    lost = []

    def lose_first(tx_hash: Any, *args: Any, **kw: Any) -> Any:
        receipt = real(tx_hash, *args, **kw)  # mined...
        if not lost:
            lost.append(tx_hash)
            raise TimeExhausted("no receipt in time")  # ... but the sender never hears of it
        return receipt

    monkeypatch.setattr(chain.w3.eth, "wait_for_transaction_receipt", lose_first)
    start = head(chain)
    await sink.write(round_batch(1))
    assert lost and sink.retries == 1
    assert txs_after(chain, start) == [1]  # the retry found the root anchored: nothing resent
    assert chain.anchor_count() == 1
    with sa.create_engine(f"sqlite:///{db_file(sink.db.url)}").connect() as conn:
        tx_hash = conn.execute(sa.text("SELECT tx_hash FROM chain_anchors")).scalar()
    assert tx_hash == "0x" + bytes(lost[0]).hex()


async def test_a_failed_database_write_sends_nothing(sink: DualSink, tmp_path: Path) -> None:
    chain = chain_of(sink)
    start = head(chain)
    bad = transaction(1)
    bad = Transaction(**{**bad.row(), "seller_id": None})  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(sa.exc.IntegrityError):
        await sink.write(Batch((bad, *round_batch(1).records)))
    assert txs_after(chain, start) == []
    assert read_rows(dual_url(tmp_path), "rounds") == []
    await sink.write(round_batch(1))
    assert txs_after(chain, start) == [1]


async def test_restart_anchors_what_a_crash_left(tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    first = fast(open_sink(url))
    await first.start()
    await first.write(round_batch(1))
    # A round written ahead (pending) whose transaction never went out...
    with Outage(chain_of(first)), pytest.raises(ConnectionError):
        await first.write(round_batch(2))
    # ... and rows durable in the database that no anchor covers (a crash right after the
    # database commit): written here by the database sink alone.
    with Outage(chain_of(first)):
        await first.close()  # cannot anchor: leaves it to the next start
    plain = DatasetSink(parse_url(url).db_url)
    await plain.start()
    await plain.write(round_batch(3))
    await plain.close()
    assert not ledger_cmd.verify(url).ok

    second = fast(open_sink(url))
    await second.start()  # resolves the pending anchor, anchors the uncovered rows
    chain = chain_of(second)
    assert chain.anchor_count() == 3
    await second.write(round_batch(4))
    await second.close()
    report = ledger_cmd.verify(url)
    assert report.ok, ledger_cmd.render(report)
    assert [a.label for a in report.anchors] == [f"r{T0 + 900 * i}-{T0 + 900 * (i - 1)}" for i in range(1, 5)]


async def test_a_transaction_mined_before_a_crash_is_not_sent_again(tmp_path: Path) -> None:
    url = dual_url(tmp_path)
    first = fast(open_sink(url))
    await first.start()
    with Outage(chain_of(first)), pytest.raises(ConnectionError):
        await first.write(round_batch(1))
    with Outage(chain_of(first)):
        await first.close()
    # The transaction did reach the chain (say, the node was slow, then the process died):
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        root, start, end, n = conn.execute(
            "SELECT root, interval_start, interval_end, records FROM chain_anchors"
        ).fetchone()
        contract = conn.execute("SELECT contract FROM chain_contracts").fetchone()[0]
    chain = EvmAnchor.in_process(str(tmp_path / "ledger.db.evm"))
    chain.attach(contract)
    money = net_transfers(money_deltas((r.TABLE, r.row()) for r in round_batch(1).records))
    assert chain.anchor(bytes.fromhex(root[2:]), (start, end), n, money).transactions == 1
    block = head(chain)
    chain.close()

    second = fast(open_sink(url))
    await second.start()
    assert txs_after(chain_of(second), block) == []  # found on the chain: not resent
    await second.close()
    report = ledger_cmd.verify(url)
    assert report.ok, ledger_cmd.render(report)
    assert report.anchors[0].tx_hash and report.anchors[0].block == block


async def test_dual_urls(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    assert parse_url(f"evm+sqlite:///{db}").state == f"{db}.evm"
    assert parse_url(f"evm+sqlite:///{db}?evm_state=memory").state is None
    node = parse_url(f"evm+sqlite:///{db}?chain=http://127.0.0.1:8545&contract=0xAb&max_transfers=40")
    assert (node.db_url, node.chain, node.state, node.contract, node.max_transfers) == (
        f"sqlite:///{db}",
        "http://127.0.0.1:8545",
        None,
        "0xAb",
        40,
    )
    pg = parse_url("evm+postgresql+psycopg://u@h/db?sslmode=require&evm_state=/x/c.evm")
    assert (pg.db_url, pg.state) == ("postgresql+psycopg://u@h/db?sslmode=require", "/x/c.evm")
    bad_urls = (
        "evm+sqlite://",
        f"evm+sqlite:///{db}?chain=http://n&evm_state=/x",
        "evm+mysql://u@h/db",
        f"evm+sqlite:///{db}?max_transfers=0",
    )
    for bad in bad_urls:
        with pytest.raises(ValueError):
            open_sink(bad)
    # readers of the database take a chain ledger's URL too
    sink = open_sink(f"evm+sqlite:///{db}")
    await sink.start()
    await sink.write(round_batch(1))
    await sink.close()
    assert read_rows(f"evm+sqlite:///{db}", "rounds") == read_rows(f"sqlite:///{db}", "rounds")
    assert ledger_digest(f"evm+sqlite:///{db}") == ledger_digest(f"sqlite:///{db}")


# -- end to end ------------------------------------------------------------------------------------


async def test_sim_on_a_chain_ledger_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`microte sim` (a `microte market --ledger evm+sqlite:///...` subprocess, real clients),
    then `microte ledger verify` in this process, against the chain the market left in its file."""
    url = dual_url(tmp_path, "sim.db")
    result = await run_sim(SCENARIO, ledger=url, participants=6, days=0.1, progress=False)
    assert result.missing_total == 0
    rounds = read_rows(url, "rounds")
    report = ledger_cmd.verify(url)
    assert report.ok, ledger_cmd.render(report)
    assert len(report.anchors) == len(rounds) == result.summary.rounds
    assert sum(a.records for a in report.anchors) == sum(
        len(read_rows(url, t))
        for t in ("transactions", "settlements", "meters", "rounds", "runs", "entries", "cancels")
    )
    chain = EvmAnchor.in_process(f"{db_file(url)}.evm", readonly=True)
    try:
        # one block per anchor, one transaction in each; the deployment before them
        assert txs_after(chain, 0) == [1] * (1 + len(rounds))
    finally:
        chain.close()
    code, out = verify_cli([url], capsys)
    assert code == 0 and out.strip().endswith("match the chain")


async def test_chain_ledger_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    url = f"evm+{pg_url}?evm_state={tmp_path / 'chain.evm'}"
    sink = fast(open_sink(url))
    await sink.start()
    await sink.write(every_kind())
    for i in range(1, 3):
        await sink.write(round_batch(i))
    await sink.close()
    report = ledger_cmd.verify(url)
    assert report.ok, ledger_cmd.render(report)
    engine = sa.create_engine(parse_url(url).db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE settlements SET quantity = quantity + 1 WHERE commit_id = 'c-2'"))
    engine.dispose()
    assert ledger_cmd.verify(url).tampered == [("settlements", "c-2")]


# -- a JSON-RPC node on loopback: ganache from the npm registry ------------------------------------

GANACHE = "ganache@7.9.2"
# ganache --wallet.deterministic: account 1's well-known private key (account 0 is unlocked)
GANACHE_KEY_1 = "0x6cbed15c793ce57650b9877cf6fa156fbef513c4e6134f022a85b1ffdd59b2a1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rpc(url: str, method: str) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": []}).encode()
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.loads(response.read())["result"]


@pytest.fixture(scope="module")
def ganache() -> Iterator[str]:
    """A ganache node on 127.0.0.1 (run by npx: fetched from the npm registry on first use)."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx (Node.js) is not installed: the JSON-RPC node tests run ganache from npm")
    port = _free_port()
    args = [npx, "--yes", GANACHE, "--server.host", "127.0.0.1", "--server.port", str(port)]
    args += ["--wallet.deterministic", "--miner.instamine", "eager", "--logging.quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the first run downloads ganache
        while True:
            try:
                _rpc(url, "eth_chainId")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    pytest.fail(f"ganache did not start ({' '.join(args)}): {err[-2000:]}", pytrace=False)
                time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # npx, its shell and node: the group started here
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def test_json_rpc_node_anchors_and_verifies(
    ganache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same ledger on a real node over HTTP: the node's unlocked account, then a local key."""
    for name, key in (("unlocked.db", None), ("signed.db", GANACHE_KEY_1)):
        if key is None:
            monkeypatch.delenv("MICROTE_CHAIN_KEY", raising=False)
        else:
            monkeypatch.setenv("MICROTE_CHAIN_KEY", key)
        url = f"evm+sqlite:///{tmp_path / name}?chain={ganache}"
        sink = fast(open_sink(url))
        await sink.start()
        chain = chain_of(sink)
        start = head(chain)
        await sink.write(every_kind())
        for i in range(1, 4):
            await sink.write(round_batch(i))
        assert txs_after(chain, start) == [1, 1, 1, 1]
        assert chain.operator() == (chain.w3.eth.accounts[0] if key is None else chain.account.address)  # type: ignore[union-attr]
        await sink.close()
        report = ledger_cmd.verify(url)
        assert report.ok, ledger_cmd.render(report)
        assert "JSON-RPC node" in report.chain and report.accounts > 0
    victim = f"m{T0 + 1800}/H01"
    tamper(url, "UPDATE meters SET consumption = '{}' WHERE id = ?", victim)
    assert ledger_cmd.verify(url).tampered == [("meters", victim)]
    # The contract of signed.db belongs to account 1: the node's account 0 may not anchor on it.
    monkeypatch.delenv("MICROTE_CHAIN_KEY")
    with pytest.raises(ChainError, match="operator is"):
        await fast(open_sink(url)).start()


async def test_sim_anchored_on_a_json_rpc_node(ganache: str, tmp_path: Path) -> None:
    url = f"evm+sqlite:///{tmp_path / 'sim.db'}?chain={ganache}"
    result = await run_sim(SCENARIO, ledger=url, participants=6, days=0.1, progress=False)
    report = ledger_cmd.verify(url)
    assert report.ok, ledger_cmd.render(report)
    assert len(report.anchors) == result.summary.rounds
