"""`microte flexsim` (seed 001 simulation): determinism and a sane report."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from controller import runloop
from controller.flexsim import (
    FLEX_TABLES,
    FlexSimParams,
    add_arguments,
    flex_digest,
    load_params,
    main,
    make_world,
    render,
    run,
    run_async,
)
from ledger import read_rows

SMALL = FlexSimParams(seed=11, prosumers=30, initial=5, days=1.5, request_rate=1.0)


def test_same_seed_same_report_other_seed_other_report() -> None:
    first, second = run(SMALL), run(SMALL)
    assert first == second
    assert render(first) == render(second)
    other = run(FlexSimParams(seed=12, prosumers=30, initial=5, days=1.5, request_rate=1.0))
    assert render(other) != render(first)


def test_world_mix_joins_and_renegotiations() -> None:
    world = make_world(SMALL)
    assert {p.source for p in world.prosumers} == {"solar", "wind", "bess"}
    joins = [p.joins for p in world.prosumers]
    assert joins == sorted(joins) and joins[:5] == [0] * 5 and all(t > 0 for t in joins[5:])
    assert len({p.id for p in world.prosumers}) == 30
    assert any(r.downward for r in world.renegotiations) and any(not r.downward for r in world.renegotiations)
    for p in world.prosumers:
        assert p.terms.flex_up > 0 or p.terms.flex_down > 0
        assert 0 <= p.reliability <= 1


def test_report_is_sane_per_strategy() -> None:
    report = run(SMALL)
    fair, reputation = report.results
    assert (fair.strategy, reputation.strategy) == ("fair", "reputation")
    assert fair.requests == reputation.requests == report.world.requests > 0
    assert fair.requested_wh == reputation.requested_wh  # the same requests, to the same community
    for r in report.results:
        assert 0 < r.delivered_wh <= r.allocated_wh <= r.requested_wh
        assert r.met <= r.allocations
        assert r.records > 0
    assert fair.displaced == 0  # fair gives every accepting prosumer a share
    # fair stops at 25 % of each contract; reputation uses whole contracts
    assert reputation.allocated_wh > fair.allocated_wh
    assert fair.shortfall_requests >= reputation.shortfall_requests
    table = render(report)
    assert "delivered / requested" in table and "fair" in table and "reputation" in table


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "flex.toml"
    params.write_text("[flexsim]\nseed = 3\nprosumers = 12\ndays = 0.5\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args([str(params), "--strategy", "reputation"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("flexsim seed=3: 12 prosumers") and "reputation" in out and " fair" not in out
    assert load_params(str(params), days=2.0).days == 2.0
    with pytest.raises(SystemExit):
        load_params(None, prosumers=0)


# -- the aggregator's settings, tokens and forecast (issue #20 items 2-4) ----------------------


def test_fair_modulation_cap_is_a_scenario_parameter(tmp_path: Path) -> None:
    params = tmp_path / "flex.toml"
    params.write_text("[flexsim]\nseed = 11\nprosumers = 30\ninitial = 5\ndays = 1.5\nrequest_rate = 1.0\n")
    seed_cap = run(load_params(str(params)))
    params.write_text(params.read_text() + "max_modulation_pct = 50\n")
    assert load_params(str(params)).max_modulation_pct == 50
    wide = run(load_params(str(params)))
    (fair25, rep25), (fair50, rep50) = seed_cap.results, wide.results
    # requests of 5-50 %: at the seed's 25 % fair is short by design; at 50 % it covers more
    assert fair50.allocated_wh > fair25.allocated_wh and fair50.shortfall_requests < fair25.shortfall_requests
    assert rep50 == rep25  # the cap is fair's alone
    with pytest.raises(SystemExit):
        load_params(None, max_modulation_pct=0)


def test_set_overrides_any_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--seed", "3", "--prosumers", "12", "--days", "0.5", "--strategy", "fair"]
    argv += ["--set", "max_modulation_pct=40", "--set", "request_fraction=[0.05, 0.25]", "--set", "forecast=true"]
    assert main(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "grid requests of 5%-25%" in out and "max modulation 40 %, forecast on" in out
    with pytest.raises(SystemExit):
        main(parser.parse_args([*argv, "--set", "no_such_field=1"]))


def test_no_balance_goes_negative_and_a_small_budget_cuts_requests() -> None:
    funded = run(SMALL)
    for r in funded.results:
        assert r.budget_requests == 0 and r.min_balance >= 0
        assert r.tokens_left == round(SMALL.budget * 1e6) - r.rewards + r.penalties_paid
        assert r.penalties_paid <= r.penalties
    poor = run(msgspec.structs.replace(SMALL, budget=2.0))
    for r, rich in zip(poor.results, funded.results, strict=True):
        assert r.budget_requests > 0 and r.min_balance >= 0 and r.tokens_left >= 0
        assert r.rewards <= 2_000_000 + r.penalties_paid  # never paid more than it had
        assert r.delivered_wh < rich.delivered_wh
    broke = run(msgspec.structs.replace(SMALL, budget=0.0))
    for r in broke.results:  # nothing minted: nothing allocated, nothing owed
        assert (r.allocations, r.rewards, r.tokens_left, r.min_balance) == (0, 0, 0, 0)


def _night_solar_curtailments(ledger_dir: Path, strategy: str) -> int:
    """Allocations asking a solar contract to curtail (down) in a window the sun never lit."""
    from market.flexibility.forecast import daylight_permille

    url = f"sqlite:///{ledger_dir / f'flexsim-inproc-{strategy}.db'}"
    solar = {r["contract_id"] for r in read_rows(url, "flex_contracts") if r["source"] == "solar"}
    windows = {r["id"]: (r["time_delivery_start"], r["time_delivery_end"]) for r in read_rows(url, "flex_requests")}
    night = 0
    for a in read_rows(url, "flex_allocations"):
        start, end = windows[a["request_id"]]
        if a["status"] == "allocated" and a["power"] < 0 and a["contract_id"] in solar:
            night += daylight_permille(start, end, 50.0, 0.0, 15.0) == 0
    return night


def test_forecast_keeps_curtailment_requests_off_solar_sites_at_night(tmp_path: Path) -> None:
    params = msgspec.structs.replace(SMALL, days=2.0, up_share=0.3, strategies=("reputation",))
    blind = runloop.run(run_async(params, ledger_dir=tmp_path / "blind"))[0].results[0]
    seeing = runloop.run(run_async(msgspec.structs.replace(params, forecast=True), ledger_dir=tmp_path / "seeing"))
    assert _night_solar_curtailments(tmp_path / "blind", "reputation") > 0
    assert _night_solar_curtailments(tmp_path / "seeing", "reputation") == 0
    assert seeing[0].results[0].met_share > blind.met_share  # fewer allocations it could not deliver


def test_the_inproc_ledger_holds_what_the_report_digests(tmp_path: Path) -> None:
    report, loads = runloop.run(run_async(SMALL, ledger_dir=tmp_path))
    assert loads == ()
    for r in report.results:
        url = f"sqlite:///{tmp_path / f'flexsim-inproc-{r.strategy}.db'}"
        rows = {t: read_rows(url, t) for t in FLEX_TABLES}
        assert flex_digest(rows) == r.digest and sum(map(len, rows.values())) == r.records
