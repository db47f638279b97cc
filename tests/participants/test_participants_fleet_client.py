"""FleetClient builds profiles ahead of the rounds that need them (no socket needed)."""

from __future__ import annotations

import numpy as np
import pytest

import participants.fleet_client as fleet_client
import participants.synthetic as synthetic
from participants.fleet_client import AHEAD, FleetClient
from participants.messages import Settled, StartRound
from participants.prosumer import Prosumer
from participants.spec import synthetic_spec
from participants.synthetic import _Synthetic

D = 900
MIDNIGHT = 1781568000  # 2026-06-16T00:00:00Z


@pytest.fixture(autouse=True)
def _own_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test builds its own day blocks: none shared from an earlier test's profiles."""
    monkeypatch.setattr(synthetic, "_SHARED_BLOCKS", {})


def fleet(n: int, population: bool = False) -> FleetClient:
    rng = np.random.default_rng(7)
    return FleetClient([(synthetic_spec(i, rng), "token") for i in range(n)], seed=42, population=population)


def round_at(t: int) -> StartRound:
    return StartRound(time=t, current_round=(t, t + D), next_settle=(t + 2 * D, t + 3 * D))


def day_builds(fc: FleetClient, monkeypatch: pytest.MonkeyPatch) -> int:
    """Day blocks built when every prosumer meters the first slot after midnight."""
    calls = []
    block = _Synthetic.wh_block
    monkeypatch.setattr(_Synthetic, "wh_block", lambda self, *a: calls.append(1) or block(self, *a))
    for p in fc.prosumers.values():
        p.energy((MIDNIGHT, MIDNIGHT + D))
    if fc.population is not None:
        fc.population.energy((MIDNIGHT, MIDNIGHT + D))
    return len(calls)


@pytest.mark.parametrize("population", [False, True])
def test_the_rounds_before_midnight_build_the_next_day_a_share_each(
    monkeypatch: pytest.MonkeyPatch, population: bool
) -> None:
    ahead, cold = fleet(40, population), fleet(40, population)
    assert (ahead.population is not None) == population and (not ahead.prosumers) == population
    first = MIDNIGHT - 2 * D - AHEAD * D  # the first round whose warm-up slot is past midnight
    for t in range(first, MIDNIGHT - 2 * D, D):
        ahead._ahead(round_at(t))
    synthetic._SHARED_BLOCKS.clear()  # the cold fleet's profiles take nothing of the warm one's
    assert day_builds(cold, monkeypatch) > 0
    assert day_builds(ahead, monkeypatch) == 0


def test_built_ahead_is_the_same_energy(monkeypatch: pytest.MonkeyPatch) -> None:
    fc = fleet(20)
    for t in range(MIDNIGHT - 40 * D, MIDNIGHT, D):
        fc._ahead(round_at(t))
    synthetic._SHARED_BLOCKS.clear()  # the fresh prosumers compute theirs
    for pid, p in fc.prosumers.items():
        fresh = Prosumer(p.spec, 42)
        for t in range(MIDNIGHT - 4 * D, MIDNIGHT + 20 * D, D):
            assert p.energy((t, t + D)) == fresh.energy((t, t + D)), pid


def test_logins_are_split_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    creds = [{"id": f"S{i:04d}", "token": "t" * 24} for i in range(2000)]
    chunks = fleet_client._login_chunks(creds)
    assert [c for chunk in chunks for c in chunk] == creds
    assert all(len(str(chunk)) < 64_000 for chunk in chunks) and len(chunks) > 1


def test_bad_events_for_members_are_counted_and_change_nothing() -> None:
    """A batch naming a stranger, one member's malformed fill and a good fill: the stranger
    and the bad payload are counted as errors, the good fill is taken."""
    fc = fleet(3, population=True)
    pop = fc.population
    assert pop is not None
    good, bad = pop.ids[0], pop.ids[1]
    slot = [MIDNIGHT, MIDNIGHT + D]
    fill = {"side": "bid", "quantity": 120, "price": 0.2, "time_delivery": slot, "commit_id": "c1"}
    events = [
        {"participant": "stranger", **fill},
        {"participant": bad, "side": "bid", "quantity": "lots", "time_delivery": slot},
        {"participant": good, **fill},
    ]
    fc._dispatch({"events": events}, Settled, "on_settled_msg")
    fc._dispatch({"events": "not a list"}, Settled, "on_settled_msg")
    assert fc.errors == 2
    stats = fc.stats()
    assert stats[bad].errors == 1 and stats[bad].fills == 0
    assert stats[good].fills == 1 and stats[good].bought_wh == 120
    assert pop.committed(MIDNIGHT)[0].tolist() == [120, 0, 0]


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("delivery.columns", {"time_delivery": [0, D], "participant": ["S0001"], "rows": [[0]], "transactions": {}}),
        (
            "delivery.columns",
            {
                "time_delivery": [0, D],
                "participant": ["S0001"],
                "rows": [[1]],  # the table has one row
                "transactions": {
                    **{f: ["S0001"] for f in ("seller_id", "buyer_id")},
                    **{f: [1] for f in ("quantity", "amount_buy", "amount_sell")},
                    "kind": ["grid_buy"],
                    "id": ["t"],
                    "energy_source": [None],
                },
            },
        ),
        (
            "settled.columns",
            {
                "participant": ["S0001", "S0002"],
                "side": ["bid"],  # one item short
                **{f: [1, 1] for f in ("quantity", "price")},
                "time_delivery": [[0, D], [0, D]],
                **{f: [None, None] for f in ("commit_id", "uuid", "id", "source")},
            },
        ),
        ("settled.columns", ["not", "a", "table"]),
    ],
)
@pytest.mark.parametrize("population", [False, True])
async def test_a_bad_columnar_result_is_an_error_and_changes_nothing(
    event: str, payload: object, population: bool
) -> None:
    fc = fleet(2, population)
    before = fc.stats()
    handler = fc._on_delivery_columns if event == "delivery.columns" else fc._on_settled_columns
    await handler(payload)
    assert fc.errors == 1
    assert fc.stats() == before


@pytest.mark.parametrize("population", [False, True])
async def test_columnar_results_reach_each_member_as_its_v1_events(population: bool) -> None:
    """One `settled.columns` and one `delivery.columns` count as the members' v1 events."""
    columnar, v1 = fleet(2, population), fleet(2, population)
    fill = {"side": "bid", "quantity": 40, "price": 0.2, "time_delivery": [0, D], "commit_id": "c0-0"}
    fill |= {"uuid": "u", "id": None, "source": "solar"}
    await columnar._on_settled_columns({"participant": ["S0002"], **{k: [v] for k, v in fill.items()}})
    await v1._on_settled({"events": [{"participant": "S0002", **fill}]})
    rows = {
        "kind": ["p2p", "grid_buy"],
        "seller_id": ["S0001", "grid"],
        "buyer_id": ["S0002", "S0002"],
        "quantity": [40, 10],
        "amount_buy": [8000, 3000],
        "amount_sell": [7000, 3000],
        "id": ["t0", "t1"],
        "energy_source": ["solar", "grid"],
    }
    table = {"time_delivery": [0, D], "participant": ["S0001", "S0002"], "rows": [[0], [0, 1]], "transactions": rows}
    await columnar._on_delivery_columns(table)
    each = [{f: values[j] for f, values in rows.items()} for j in range(2)]
    delivery = [
        {"participant": "S0001", "time_delivery": [0, D], "transactions": each[:1]},
        {"participant": "S0002", "time_delivery": [0, D], "transactions": each},
    ]
    await v1._on_delivery({"events": delivery})
    assert columnar.stats() == v1.stats()
    assert columnar.stats()["S0002"].paid == 11000 and columnar.stats()["S0001"].received == 7000
    assert columnar.errors == v1.errors == 0


@pytest.mark.parametrize("population", [False, True])
async def test_deliveries_are_held_within_a_bound_and_all_counted(population: bool) -> None:
    """`delivery.columns` are accounted after the next round's orders are sent: held at most
    MAX_HELD_DELIVERIES (a server that sends only deliveries cannot grow the list), and every
    one counted once the stats are read, as the v1 events count them."""
    held, v1 = fleet(2, population), fleet(2, population)
    n = fleet_client.MAX_HELD_DELIVERIES + 3
    for k in range(n):
        slot = [k * D, (k + 1) * D]
        rows = {
            "kind": ["grid_buy"],
            "seller_id": ["grid"],
            "buyer_id": ["S0001"],
            "quantity": [10 + k],
            "amount_buy": [3000 + k],
            "amount_sell": [3000 + k],
            "id": [f"t{k}"],
            "energy_source": ["grid"],
        }
        await held._on_delivery_columns(
            {"time_delivery": slot, "participant": ["S0001"], "rows": [[0]], "transactions": rows}
        )
        assert len(held._held_deliveries) <= fleet_client.MAX_HELD_DELIVERIES
        tx = {f: values[0] for f, values in rows.items()}
        await v1._on_delivery({"events": [{"participant": "S0001", "time_delivery": slot, "transactions": [tx]}]})
    assert held.stats() == v1.stats() and held._held_deliveries == []
    assert held.stats()["S0001"].delivered == n and held.stats()["S0001"].paid == sum(3000 + k for k in range(n))


@pytest.mark.parametrize("population", [False, True])
def test_only_the_rounds_whose_share_enters_a_new_day_build_ahead(
    monkeypatch: pytest.MonkeyPatch, population: bool
) -> None:
    """A day of rounds: each share's visit finds its day built but for the AHEAD rounds whose
    slot AHEAD on is in the next day (the others would only find cached blocks: ~1 ms a
    round at 1,000 prosumers)."""
    fc = fleet(32, population)
    calls: list[tuple[int, int]] = []
    if population:
        assert fc.population is not None
        monkeypatch.setattr(fc.population, "prepare", lambda slot, rows: calls.append(slot))
    else:
        for p in fc.prosumers.values():
            monkeypatch.setattr(p, "warm", lambda slots: calls.extend(slots))
    day = 86400 // D
    for k in range(day):
        fc._ahead(round_at(MIDNIGHT + k * D))
    firsts = sorted({s for s, _ in calls})
    assert firsts == [MIDNIGHT + 86400 + j * D for j in range(AHEAD)]  # the next day's first AHEAD slots


@pytest.mark.parametrize("population", [False, True])
def test_replies_are_counted_per_member_and_order(population: bool) -> None:
    """A member with two orders counts both; a refused index counts as rejected; a reading
    refused counts an error; a failed batch counts an error for each item."""
    fc = fleet(3, population)
    a, b, c = (fc.population.ids if fc.population is not None else list(fc.prosumers))[:3]

    def stats(pid: str) -> tuple[int, int, int]:
        s = fc.population.stats_of(fc.population.index[pid]) if fc.population is not None else fc.prosumers[pid].stats
        return s.accepted, s.rejected, s.errors

    refused = [{"index": 2, "code": "invalid", "message": "x"}]
    fc._record("orders.columns", [a, a, b], {"ok": True, "uuid": ["u1", "u2", None], "refused": refused})
    fc._record("meters.columns", [a, b, c], {"ok": True, "refused": [{"index": 1, "code": "closed", "message": "y"}]})
    fc._record("orders", [c], {"ok": True, "results": [{"ok": False}]})
    fc._record("meters.columns", [c], {"ok": False, "error": {"code": "unavailable", "message": "z"}})
    assert (stats(a), stats(b), stats(c)) == ((2, 0, 0), (0, 1, 1), (0, 1, 1))
    assert fc.errors == 1
