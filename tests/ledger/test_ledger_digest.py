"""ledger_digest and read_rows: same content -> same digest, whatever the batch split."""

from __future__ import annotations

from pathlib import Path

import pytest
from ledger_samples import every_kind, settlement, transaction

from ledger import DatasetSink, ledger_digest, read_rows
from market.core.records import Batch, Record, RunRecord


async def write_ledger(path: Path, batches: list[Batch]) -> str:
    url = f"sqlite:///{path}"
    sink = DatasetSink(url)
    await sink.start()
    for batch in batches:
        await sink.write(batch)
    await sink.close()
    return url


def records() -> list[Record]:
    return [
        *every_kind().records,
        *(transaction(i) for i in range(10, 40)),
        *(settlement(i) for i in range(10, 20)),
    ]


async def test_digest_ignores_batch_split_and_order(tmp_path: Path) -> None:
    recs = records()
    one = await write_ledger(tmp_path / "one.db", [Batch(tuple(recs))])
    split = await write_ledger(tmp_path / "split.db", [Batch(tuple(recs[i : i + 7])) for i in range(0, len(recs), 7)])
    backwards = await write_ledger(tmp_path / "back.db", [Batch((r,)) for r in reversed(recs)])
    digest = ledger_digest(one)
    assert len(digest) == 64
    assert ledger_digest(split) == digest
    assert ledger_digest(backwards) == digest


async def test_digest_changes_with_any_value(tmp_path: Path) -> None:
    recs = records()
    base = ledger_digest(await write_ledger(tmp_path / "base.db", [Batch(tuple(recs))]))
    i = next(k for k, r in enumerate(recs) if r == transaction(10))
    for n, changed in enumerate(
        [
            transaction(10, price=transaction(10).price_buy + 1e-12),  # last bits of a float
            transaction(10, commit_id=None),
        ]
    ):
        other = [*recs[:i], changed, *recs[i + 1 :]]
        url = await write_ledger(tmp_path / f"other{n}.db", [Batch(tuple(other))])
        assert ledger_digest(url) != base
    fewer = await write_ledger(tmp_path / "fewer.db", [Batch(tuple(recs[:-1]))])
    assert ledger_digest(fewer) != base


async def test_digest_covers_the_outcome_tables_only(tmp_path: Path) -> None:
    recs = records()
    run = RunRecord(id="run-2", scenario="other", seed=7, started=123, config="{}")
    a = await write_ledger(tmp_path / "a.db", [Batch(tuple(recs))])
    b = await write_ledger(tmp_path / "b.db", [Batch((*recs, run))])
    assert ledger_digest(a) == ledger_digest(b)


async def test_read_rows_orders_by_key(tmp_path: Path) -> None:
    url = await write_ledger(tmp_path / "l.db", [Batch((settlement(3), settlement(1), settlement(2)))])
    assert [r["commit_id"] for r in read_rows(url, "settlements")] == ["c-1", "c-2", "c-3"]
    with pytest.raises(ValueError, match="unknown ledger table"):
        read_rows(url, "nope")


def test_missing_ledger_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ledger_digest(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
