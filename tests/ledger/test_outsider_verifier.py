"""docs/verify_ledger.py, the verifier an outsider writes from docs/chain.md alone: run as a
subprocess against a real run's ledger (a `microte sim` on `evm+sqlite:///`), untampered and
after one value of one row was changed with sqlite3 (a float, a boolean, a string) or a row
deleted; its leaf encoding against microte's (`ledger.merkle`) for every column type, its
float rule against msgspec; it imports nothing from microte; the docs' tables are the
schema's."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_samples import every_kind
from sqlalchemy.dialects import sqlite
from web3 import Web3

from controller import ledger_cmd
from ledger import merkle, open_sink
from ledger.dual import DualSink
from ledger.evm import ARTIFACT, EvmAnchor
from ledger.schema import TABLE_MAP, columns_markdown

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "verify_ledger.py"
DOCS = ROOT / "docs" / "chain.md"
MICROTE_PACKAGES = {"market", "participants", "controller", "ledger", "tests"}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_ledger", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["verify_ledger"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


vl = load_script()


def outsider(*args: str) -> tuple[int, str]:
    """Run the script as an outsider would: its own process, from another directory."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=SCRIPT.parent
    )
    assert not proc.stderr or proc.returncode == 2, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def url_of(db: Path) -> str:
    return f"evm+sqlite:///{db}"


def change(db: Path, sql: str, *params: Any, rows: int = 1) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute(sql, params).rowcount == rows
    conn.close()


def one(db: Path, sql: str, *params: Any) -> tuple[Any, ...]:
    with sqlite3.connect(db) as conn:
        row = conn.execute(sql, params).fetchone()
    conn.close()
    assert row is not None, sql
    return tuple(row)


def summary(out: str) -> str:
    return out.strip().splitlines()[-1]


# -- a real run ---------------------------------------------------------------------------------


def test_a_real_run_verifies(run_copy: Path) -> None:
    code, out = outsider(url_of(run_copy))
    assert code == 0, out
    anchors, records = one(run_copy, "SELECT count(*), sum(records) FROM chain_anchors WHERE status = 'anchored'")
    assert anchors > 10
    assert summary(out) == f"OK: {anchors} anchors, {records} records verify against the chain"
    assert not [line for line in out.splitlines() if line.startswith(("TAMPERED", "FAILED", "UNANCHORED"))]
    # the run has trades, settlements (a BOOLEAN column) and money: the cases below need them
    assert one(run_copy, "SELECT count(*) FROM settlements")[0] > 0
    assert "tokens: " in out and "tokens: 0 accounts" not in out
    # and microte's own verifier agrees
    assert ledger_cmd.verify(url_of(run_copy)).ok
    # the other spellings of the same ledger
    assert outsider(str(run_copy))[0] == 0
    assert outsider(f"sqlite:///{run_copy}", "--chain-file", f"{run_copy}.evm")[0] == 0


def test_a_changed_float_is_named(run_copy: Path) -> None:
    key, price = one(run_copy, "SELECT id, price_buy FROM transactions WHERE kind = 'p2p' ORDER BY id LIMIT 1")
    change(run_copy, "UPDATE transactions SET price_buy = ? WHERE id = ?", math.nextafter(price, 1.0), key)
    code, out = outsider(url_of(run_copy))
    assert code == 1, out
    assert f"TAMPERED transactions {key}: row changed since it was anchored" in out
    assert f"rows: transactions {key}" in summary(out) and summary(out).startswith("FAILED: 1 of ")
    assert not ledger_cmd.verify(url_of(run_copy)).ok  # a 1-ulp change: both see it


def test_a_flipped_boolean_is_named_with_its_column(run_copy: Path) -> None:
    key, dispatch = one(run_copy, "SELECT commit_id, dispatch FROM settlements ORDER BY commit_id LIMIT 1")
    change(run_copy, "UPDATE settlements SET dispatch = ? WHERE commit_id = ?", 1 - dispatch, key)
    code, out = outsider(url_of(run_copy))
    assert code == 1, out
    was, now = ("true", "false") if dispatch else ("false", "true")
    assert (
        f"TAMPERED settlements {key}: row changed since it was anchored; column dispatch: anchored as {was}, now {now}"
    ) in out
    assert f"rows: settlements {key} (dispatch)" in summary(out)


def test_a_changed_string_is_named(run_copy: Path) -> None:
    key, generation = one(run_copy, "SELECT id, generation FROM meters ORDER BY id DESC LIMIT 1")
    forged = json.dumps({**json.loads(generation), "solar": 1}, separators=(",", ":"))
    assert forged != generation
    change(run_copy, "UPDATE meters SET generation = ? WHERE id = ?", forged, key)
    code, out = outsider(url_of(run_copy))
    assert code == 1, out
    assert f"TAMPERED meters {key}: row changed since it was anchored" in out
    assert f"rows: meters {key}" in summary(out)


def test_a_value_of_the_wrong_type_names_its_column(run_copy: Path) -> None:
    (key,) = one(run_copy, "SELECT id FROM transactions ORDER BY id LIMIT 1")
    change(run_copy, "UPDATE transactions SET quantity = 'lots' WHERE id = ?", key)
    code, out = outsider(url_of(run_copy))
    assert code == 1
    assert f"TAMPERED transactions {key}: row changed since it was anchored; column quantity:" in out


def test_a_deleted_row_is_named(run_copy: Path) -> None:
    (key,) = one(run_copy, "SELECT id FROM meters ORDER BY id LIMIT 1 OFFSET 7")
    change(run_copy, "DELETE FROM meters WHERE id = ?", key)
    code, out = outsider(url_of(run_copy))
    assert code == 1, out
    assert f"MISSING meters {key}: anchored row deleted" in out
    assert f"rows: meters {key} (deleted)" in summary(out)


def test_an_inserted_row_and_a_rewritten_leaf_are_found(run_copy: Path) -> None:
    change(run_copy, "INSERT INTO cancels VALUES ('forged', 'H01', 1, 2)")
    code, out = outsider(url_of(run_copy))
    assert code == 1 and "UNANCHORED cancels forged: no anchor covers this row" in out
    change(run_copy, "DELETE FROM cancels WHERE id = 'forged'")
    # a row changed together with its recorded leaf: the root on chain still catches it
    key, seq = one(run_copy, "SELECT key, anchor_seq FROM chain_leaves WHERE tbl = 'rounds' ORDER BY key LIMIT 1")
    change(run_copy, "UPDATE rounds SET trades = trades + 1 WHERE id = ?", key)
    change(run_copy, "UPDATE chain_leaves SET leaf = ? WHERE tbl = 'rounds' AND key = ?", "00" * 32, key)
    code, out = outsider(url_of(run_copy))
    assert code == 1
    assert f"TAMPERED anchor #{seq} " in out
    assert "the recorded leaves do not hash to the root on chain (chain_leaves altered)" in out


def test_a_changed_root_and_a_lost_anchor_are_found(run_copy: Path) -> None:
    change(run_copy, "UPDATE chain_anchors SET root = ? WHERE seq = 3", "0x" + "11" * 32)
    (leaves,) = one(run_copy, "SELECT count(*) FROM chain_leaves WHERE anchor_seq = 5")
    change(run_copy, "DELETE FROM chain_leaves WHERE anchor_seq = 5", rows=leaves)
    change(run_copy, "DELETE FROM chain_anchors WHERE seq = 5")
    code, out = outsider(url_of(run_copy))
    assert code == 1
    assert "root in chain_anchors 0x" + "11" * 32 in out
    assert re.search(r"^LOST +anchor #5 on chain", out, re.M), out
    assert "UNANCHORED " in out  # anchor 5's rows are covered by no anchor any more


def test_unreadable_ledgers_exit_2(tmp_path: Path, run_copy: Path) -> None:
    code, out = outsider(url_of(tmp_path / "nothing.db"))
    assert code == 2 and "no ledger database" in out
    code, out = outsider(str(run_copy), "--chain-file", str(tmp_path / "nothing.evm"))
    assert code == 2 and "no chain state file" in out
    code, out = outsider("evm+postgresql://db/microte")
    assert code == 2 and "SQLite" in out


def test_the_storage_reads_equal_web3_calls(run_copy: Path) -> None:
    """The chain file's tries read by the script = eth_getStorageAt and the contract's own
    view functions on the same chain (web3 over eth-tester): the layout of docs/chain.md."""
    (contract,) = one(run_copy, "SELECT contract FROM chain_contracts")
    chain = EvmAnchor.in_process(f"{run_copy}.evm", readonly=True)
    try:
        chain.attach(contract)
        from_file = vl.Ledger(vl.ChainFile(Path(f"{run_copy}.evm")), contract)
        from_rpc = vl.Ledger(vl.ChainRpc(chain.w3, "latest"), contract)
        count = chain.anchor_count()
        assert from_file.anchor_count() == from_rpc.anchor_count() == count > 0
        for i in (0, count // 2, count - 1):
            a = chain.get_anchor(i)
            expected = vl.OnChainAnchor(a.root, a.interval_start, a.interval_end, a.records, a.block)
            assert from_file.anchor(i) == from_rpc.anchor(i) == expected
            assert from_file.anchor_index(a.root) == i
            assert from_file.settled_parts(a.root) == chain.settled_parts(a.root)
        for pid in ("H01", "H06", "grid"):
            address = vl.participant_address(pid)
            assert from_file.position(address) == from_rpc.position(address) == chain.position(address)
        assert from_file.chain.code_hash(contract) == from_rpc.chain.code_hash(contract) == vl.CODE_HASH
        assert vl.ChainFile(Path(f"{run_copy}.evm")).genesis() == chain.genesis_hash()
        # the whole verification over web3 (the --rpc path) on this chain
        result = vl.verify(run_copy, vl.ChainRpc(chain.w3, "latest"))
        assert result.failures == 0, "\n".join(result.lines)
    finally:
        chain.close()


# -- every record kind, every column type -------------------------------------------------------


async def test_every_record_kind_verifies(tmp_path: Path) -> None:
    """A ledger holding one row of every table (booleans both ways, NULLs, negative and
    non-ASCII values, every money table) verifies, and every changed row is named."""
    url = url_of(tmp_path / "all.db")
    sink = open_sink(url)
    assert isinstance(sink, DualSink)
    await sink.start()
    await sink.write(every_kind())
    await sink.close()
    db = tmp_path / "all.db"
    tables = {t for (t,) in sqlite3.connect(db).execute("SELECT DISTINCT tbl FROM chain_leaves")}
    assert tables == set(TABLE_MAP)
    code, out = outsider(url_of(db))
    assert code == 0, out
    change(db, "UPDATE flex_deliveries SET met = 1 - met")
    change(db, "UPDATE grid_flows SET vm_min_pu = NULL WHERE vm_min_pu IS NOT NULL")
    code, out = outsider(url_of(db))
    assert code == 1
    assert "column met: anchored as " in out
    assert re.search(r"TAMPERED grid_flows \S+: row changed", out)


COLUMN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "BIGINT": st.integers(-(2**63), 2**63 - 1),
    "FLOAT": st.floats(allow_nan=False, allow_infinity=False),
    "BOOLEAN": st.booleans(),
    "TEXT": st.text(),
}


@st.composite
def table_rows(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    table = draw(st.sampled_from(sorted(TABLE_MAP)))
    row = {}
    for col in TABLE_MAP[table].columns:
        values = COLUMN_VALUES[declared(col)]
        row[col.name] = draw(st.none() | values if col.nullable else values)
    return table, row


def declared(col: sa.Column[Any]) -> str:
    return str(col.type.compile(dialect=sqlite.dialect()))


@settings(max_examples=400, deadline=None)
@given(table_rows())
def test_the_scripts_leaves_are_microtes(item: tuple[str, dict[str, Any]]) -> None:
    table, row = item
    types = {c.name: declared(c) for c in TABLE_MAP[table].columns}
    stored = {k: int(v) if type(v) is bool else v for k, v in row.items()}  # SQLite keeps booleans as 0/1
    assert vl.record_data(table, stored, types) == merkle.record_data(table, row)


BOUNDARIES = [
    0.0, -0.0, 1.0, 100.0, 0.1, 1 / 3, 1e-4, 9.999999999999999e-05, 1e-5, 1.2345e-05, 9.99e-06, 1e-7, 1e-300,
    5e-324, 2.2250738585072014e-308, 1e15, 9999999999999998.0, 1e16, 1.2345678901234568e17, 1e21, 1e22,
    1.7976931348623157e308, 2.0**53, 2.0**53 + 2, 0.30000000000000004, float("inf"), float("-inf"),
]  # fmt: skip


@pytest.mark.parametrize("x", [*BOUNDARIES, *(-x for x in BOUNDARIES)])
def test_the_float_rule_is_msgspecs_at_the_boundaries(x: float) -> None:
    assert vl.float_text(x) == msgspec.json.encode(x + 0.0).decode()


@settings(max_examples=3000, deadline=None)
@given(
    st.floats(allow_nan=False) | st.integers(0, 2**64 - 1).map(lambda bits: struct.unpack("<d", bits.to_bytes(8))[0])
)
def test_the_float_rule_is_msgspecs(x: float) -> None:
    """Any double (hypothesis' floats, and any 64-bit pattern: every exponent alike)."""
    if not math.isnan(x):  # NaN is never stored (SQLite makes it NULL)
        assert vl.float_text(x) == msgspec.json.encode(x + 0.0).decode()


# -- the script and the docs --------------------------------------------------------------------


def test_the_script_imports_nothing_from_microte() -> None:
    tree = ast.parse(SCRIPT.read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            modules.add(str(node.module).split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError("no dynamic imports")
    assert not modules & MICROTE_PACKAGES
    assert modules - sys.stdlib_module_names == {"web3"}, modules


def test_the_docs_list_the_schema() -> None:
    text = DOCS.read_text()
    begin = text.index("<!-- record-tables:")
    block = text[text.index("\n", begin) + 1 : text.index("<!-- /record-tables -->")].strip()
    assert block == columns_markdown(), (
        "docs/chain.md's table of record tables differs from the schema: replace the lines between "
        "<!-- record-tables: ... --> and <!-- /record-tables --> with ledger.schema.columns_markdown()"
    )


def test_the_docs_example_leaf() -> None:
    text = DOCS.read_text()
    data = re.search(r'^\["microte\.ledger\.record/1","transactions",.*\]$', text, re.M)
    leaf = re.search(r"and the leaf `([0-9a-f]{64})`", text)
    assert data is not None and leaf is not None
    raw = data.group(0).encode()
    _, table, row = json.loads(raw)
    assert merkle.record_data(table, row) == raw
    assert merkle.leaf_hash(raw).hex() == leaf.group(1)
    assert f"one line, {len(raw)} bytes" in text


def test_the_code_hash_is_the_artifacts() -> None:
    runtime = json.loads(ARTIFACT.read_text())["deployedBytecode"]
    code_hash = "0x" + bytes(Web3.keccak(hexstr=runtime)).hex()
    assert code_hash == vl.CODE_HASH
    assert code_hash in DOCS.read_text()
