"""The digest covers a PEM site's tables (house_slots, pem_slots) only when they hold rows:
a ledger without them keeps the digest it had before they existed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import sqlalchemy as sa
from ledger_samples import every_kind

from ledger import DatasetSink, connect, ledger_digest
from ledger.digest import _ordered
from ledger.schema import DIGEST_TABLES, TABLE_MAP
from market.core.records import Batch, HouseSlotRecord, PemSlotRecord, Record


def three_table_digest(url: str) -> str:
    """The digest as it was before PEM sites: transactions, settlements, meters."""
    digest = hashlib.sha256()
    encode = msgspec.json.Encoder().encode
    with connect(url) as conn:
        for table in DIGEST_TABLES:
            digest.update(encode([table, [str(c.name) for c in TABLE_MAP[table].columns]]) + b"\n")
            for row in conn.execute(_ordered(conn, table)):
                digest.update(encode([v + 0.0 if type(v) is float else v for v in row]) + b"\n")
    return digest.hexdigest()


async def write(path: Path, records: list[Record]) -> str:
    url = f"sqlite:///{path}"
    sink = DatasetSink(url)
    await sink.start()
    await sink.write(Batch(tuple(records)))
    await sink.close()
    return url


def without_pem() -> list[Record]:
    return [r for r in every_kind().records if not isinstance(r, HouseSlotRecord | PemSlotRecord)]


HOUSE = HouseSlotRecord(
    id="h900.PEM1.0", site="PEM1", house=0, time_delivery_start=900, time_delivery_end=1800,
    air_start=22.5, air_min=22.1, air_max=23.0, air_end=22.4, band_low=21.5, band_high=23.5,
    hvac_wh=350, requested=2, accepted=1, opted_out_steps=0, kh_above=0.0, kh_below=0.0,
)  # fmt: skip


async def test_without_pem_rows_the_digest_is_the_old_one(tmp_path: Path) -> None:
    url = await write(tmp_path / "a.db", without_pem())
    assert ledger_digest(url) == three_table_digest(url)
    with sa.create_engine(url).begin() as conn:  # a ledger from before the tables existed
        conn.execute(sa.text("DROP TABLE house_slots"))
        conn.execute(sa.text("DROP TABLE pem_slots"))
    assert ledger_digest(url) == three_table_digest(url)


async def test_pem_rows_are_in_the_digest(tmp_path: Path) -> None:
    plain = await write(tmp_path / "a.db", without_pem())
    with_house = await write(tmp_path / "b.db", [*without_pem(), HOUSE])
    warmer = await write(tmp_path / "c.db", [*without_pem(), msgspec.structs.replace(HOUSE, air_max=23.0001)])
    assert len({ledger_digest(plain), ledger_digest(with_house), ledger_digest(warmer)}) == 3
