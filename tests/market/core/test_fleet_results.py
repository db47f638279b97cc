"""Routing a round's fills and rows to columnar `/fleet` connections (market/core/fleet_results.py)."""

from __future__ import annotations

from collections.abc import Sequence

from market.core.engine import deliveries, settled_event
from market.core.fleet_results import Number, all_but, delivery_columns, route_rows, route_settled, settled_columns
from market.core.records import Settlement, Transaction

SLOT = (900, 1800)


def fill(seq: int, seller: str, buyer: str) -> Settlement:
    return Settlement(
        f"c900-{seq}", *SLOT, seller, buyer, f"a{seq}", f"b{seq}", None, f"my{seq}", "solar", 10, 0.2, 0.1, 2000, 1000,
        False, seq, 0,
    )  # fmt: skip


def row(i: int, seller: str, buyer: str, kind: str = "p2p") -> Transaction:
    return Transaction(f"t{i}", kind, *SLOT, seller, buyer, "solar", 10, 0.2, 0.1, 2000, 1000, None, 0)  # type: ignore[arg-type]


def numbering() -> tuple[dict[str, int], Number]:
    seqs: dict[str, int] = {}

    def number(refs: Sequence[tuple[str, object]]) -> list[int]:
        out = []
        for pid, _ref in refs:
            seqs[pid] = seqs.get(pid, 0) + 1
            out.append(seqs[pid])
        return out

    return seqs, number


def test_all_but_is_everyone_else_and_none_when_nobody_is_left_out() -> None:
    assert all_but(frozenset()) is None
    others = all_but(frozenset({"A"}))
    assert others is not None and "A" not in others and "B" in others


def test_fills_go_per_connection_and_to_the_dict_path_for_a_member_that_left() -> None:
    fills = [fill(0, "A", "B"), fill(1, "C", "A")]
    per_sid, rest = route_settled(fills, frozenset({"A", "B", "C"}), {"A": "s1", "C": "s2"})
    assert {sid: [(p, r.side) for p, r in items] for sid, items in per_sid.items()} == {
        "s1": [("A", "ask"), ("A", "bid")],
        "s2": [("C", "ask")],
    }
    assert rest == [("B", settled_event(fills[0], "bid"))]  # B left its columnar connection
    _, number = numbering()
    cols = settled_columns(per_sid["s1"], number)
    assert cols["seq"] == [1, 2] and cols["price"] == [0.1, 0.2] and cols["id"] == ["my0", None]
    for k, (_pid, ref) in enumerate(per_sid["s1"]):
        assert {f: cols[f][k] for f in cols if f not in ("participant", "seq")} == ref.payload()


def test_rows_go_per_connection_each_once_and_members_by_index() -> None:
    rows = (row(0, "A", "B"), row(1, "grid", "A", "grid_buy"), row(2, "C", "D"), row(3, "A", "A", "bess"))
    per_sid, rest = route_rows(rows, frozenset({"A", "B", "D"}), {"A": "s1", "B": "s1"})
    assert per_sid == {"s1": {"A": [0, 1, 3], "B": [0]}} and rest == {"D"}
    _, number = numbering()
    cols = delivery_columns(SLOT, rows, per_sid["s1"], number)
    assert cols["participant"] == ["A", "B"] and cols["rows"] == [[0, 1, 2], [0]]
    assert cols["transactions"]["id"] == ["t0", "t1", "t3"]  # the rows of s1's members only, once each
    expected = deliveries(SLOT, list(rows), {"A", "B"})
    for k, pid in enumerate(cols["participant"]):
        table = cols["transactions"]
        got = [{f: table[f][j] for f in table} for j in cols["rows"][k]]
        assert got == expected[pid]["transactions"]
