"""FleetClient builds profiles ahead of the rounds that need them (no socket needed)."""

from __future__ import annotations

import numpy as np
import pytest

import participants.fleet_client as fleet_client
from participants.fleet_client import AHEAD, FleetClient
from participants.messages import StartRound
from participants.prosumer import Prosumer
from participants.spec import synthetic_spec
from participants.synthetic import _Synthetic

D = 900
MIDNIGHT = 1781568000  # 2026-06-16T00:00:00Z


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
    assert day_builds(cold, monkeypatch) > 0
    assert day_builds(ahead, monkeypatch) == 0


def test_built_ahead_is_the_same_energy(monkeypatch: pytest.MonkeyPatch) -> None:
    fc = fleet(20)
    for t in range(MIDNIGHT - 40 * D, MIDNIGHT, D):
        fc._ahead(round_at(t))
    for pid, p in fc.prosumers.items():
        fresh = Prosumer(p.spec, 42)
        for t in range(MIDNIGHT - 4 * D, MIDNIGHT + 20 * D, D):
            assert p.energy((t, t + D)) == fresh.energy((t, t + D)), pid


def test_logins_are_split_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    creds = [{"id": f"S{i:04d}", "token": "t" * 24} for i in range(2000)]
    chunks = fleet_client._login_chunks(creds)
    assert [c for chunk in chunks for c in chunk] == creds
    assert all(len(str(chunk)) < 64_000 for chunk in chunks) and len(chunks) > 1
