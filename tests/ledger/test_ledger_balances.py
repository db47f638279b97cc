"""`microte ledger balances URL` on a real run's chain ledger (`microte sim` on
`evm+sqlite:///`, the `chain_run` fixture): every account's token position on chain equals
the database's net money; a tampered amount, a forged money row and rows deleted from the
database are flagged, with exit code 1."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controller import cli, ledger_cmd
from ledger import read_rows
from ledger.evm import CLEARING_ADDRESS, participant_address


def url_of(db: Path) -> str:
    return f"evm+sqlite:///{db}"


def run_cli(db: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["ledger", "balances", url_of(db)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def execute(db: Path, sql: str, *params: Any) -> int:
    with sqlite3.connect(db) as conn:
        n = conn.execute(sql, params).rowcount
    conn.close()
    return n


def line_of(out: str, who: str) -> str:
    [line] = [line for line in out.splitlines() if line.split(" ", 1)[0] == who]
    return line


def test_balances_of_a_real_run(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = ledger_cmd.balances(url_of(run_copy))
    assert report.ok, ledger_cmd.render_balances(report)
    ids = {a.who for a in report.accounts}
    people = {r["participant_id"] for r in read_rows(url_of(run_copy), "meters")}
    assert people <= ids and {"grid", "clearing"} <= ids and "?" not in ids
    by_id = {a.who: a for a in report.accounts}
    assert by_id["clearing"].address == CLEARING_ADDRESS
    assert by_id["H01"].address == participant_address("H01")
    # money moved (the grid sold energy on credit), and none was created or lost
    assert by_id["grid"].credit > 0 and by_id["grid"].chain < 0
    assert sum(a.chain for a in report.accounts) == 0 == sum(a.database for a in report.accounts)
    assert report.unanchored_rows == 0
    code, out = run_cli(run_copy, capsys)
    assert code == 0, out
    assert out.splitlines()[1].split() == ["account", "address", "balance", "credit", "chain", "net", "database", "net"]
    assert out.strip().endswith(
        f"OK: {len(report.accounts)} accounts, the chain's token positions equal the database's net money"
    )
    assert "MISMATCH" not in out
    h01 = line_of(out, "H01").split()
    assert h01[1:] == [
        by_id["H01"].address,
        *map(str, (by_id["H01"].balance, by_id["H01"].credit, by_id["H01"].chain, by_id["H01"].database)),
    ]


def test_a_tampered_amount_is_flagged(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [(key, buyer)] = (
        sqlite3.connect(run_copy)
        .execute("SELECT id, buyer_id FROM transactions WHERE kind = 'p2p' ORDER BY id LIMIT 1")
        .fetchall()
    )
    assert execute(run_copy, "UPDATE transactions SET amount_buy = amount_buy + 7 WHERE id = ?", key) == 1
    code, out = run_cli(run_copy, capsys)
    assert code == 1, out
    # the buyer paid 7 more in the database than on chain; the clearing account kept them
    assert line_of(out, buyer).endswith("MISMATCH (chain - database = 7)")
    assert line_of(out, "clearing").endswith("MISMATCH (chain - database = -7)")
    assert sum("MISMATCH" in line for line in out.splitlines()) == 2
    assert out.strip().splitlines()[-1].startswith("FAILED: 2 of ")


def test_a_forged_row_and_deleted_rows_are_flagged(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a token transfer that no anchor covers: the database says more than the chain settled
    forged = "INSERT INTO token_transfers VALUES ('forged', 'lem', 'H02', 'Zed', 100, 'x', NULL, 1, 2, 3)"
    assert execute(run_copy, forged) == 1
    # every money row of H06 gone: its address is still named by the chain's Transfer events
    assert execute(run_copy, "DELETE FROM transactions WHERE buyer_id = 'H06' OR seller_id = 'H06'") > 0
    code, out = run_cli(run_copy, capsys)
    assert code == 1, out
    assert line_of(out, "Zed").endswith("MISMATCH (chain - database = -100)")
    assert line_of(out, "H02").endswith("MISMATCH (chain - database = 100)")
    unknown = line_of(out, "?")
    assert participant_address("H06") in unknown and "MISMATCH" in unknown
    assert "1 money rows are not anchored yet (not settled on chain)" in out


def test_unreadable_ledgers_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(tmp_path / "nothing.db", capsys)
    assert code == 2 and "no ledger database" in out
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE transactions (id TEXT)").connection.close()
    code, out = run_cli(plain, capsys)
    assert code == 2 and "anchors table" in out
