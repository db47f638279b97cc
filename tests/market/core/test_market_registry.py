"""The registry: one id may hold several roles (`roles = [...]`), `role = "x"` still works,
and every lookup the namespaces use keeps its meaning for single-role ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from market.core.registry import Registry


def reg(*entries: dict[str, object]) -> Registry:
    return Registry.from_dict({"participants": list(entries)})


def test_an_id_may_hold_several_roles() -> None:
    r = reg(
        {"id": "DSO", "token": "t-dso", "roles": ["dso", "operator"]},
        {"id": "AGG", "token": "t-agg", "role": "aggregator"},
        {"id": "P1", "token": "t-p1"},
    )
    assert r.roles("DSO") == ("dso", "operator")
    assert r.roles("AGG") == ("aggregator",) and r.roles("P1") == ("prosumer",)
    assert r.roles("NOBODY") == ()
    assert r.has_role("DSO", "operator") and r.has_role("DSO", "dso", "aggregator")
    assert not r.has_role("AGG", "operator") and not r.has_role("NOBODY", "prosumer")
    # The single-role lookups every caller uses: the first role listed, ids by any role held.
    assert r.role("DSO") == "dso" and r.role("AGG") == "aggregator" and r.role("NOBODY") is None
    assert r.authenticate({"id": "DSO", "token": "t-dso"}) == ("DSO", "dso")
    assert r.authenticate({"id": "DSO", "token": "wrong"}) is None
    assert r.ids("operator") == ["DSO"] and r.ids("dso") == ["DSO"]
    assert r.ids() == ["AGG", "DSO", "P1"]
    # Made once and kept: what a caller does to the list it got changes nothing.
    r.ids().append("X")
    r.ids("prosumer").clear()
    assert r.ids() == ["AGG", "DSO", "P1"] and r.ids("prosumer") == ["P1"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "X", "token": "t", "role": "dso", "roles": ["dso"]}, "'X': give role or roles, not both"),
        ({"id": "X", "token": "t", "roles": []}, "'X': roles is empty"),
        ({"id": "X", "token": "t", "roles": ["dso", "dso"]}, "'X': role 'dso' is listed twice"),
        ({"id": "X", "token": "t", "roles": ["dso", "king"]}, "king"),
        ({"id": "X", "token": "t", "roles": "dso"}, "roles"),
    ],
)
def test_bad_role_sets_are_refused_naming_the_entry(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reg(entry)


def test_from_toml_accepts_both_spellings_and_remembers_its_path(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        '[[participants]]\nid = "DSO"\ntoken = "a"\nroles = ["dso", "operator"]\n\n'
        '[[participants]]\nid = "P1"\ntoken = "b"\nrole = "prosumer"\naddress = "cosmos1xyz"\n'
    )
    r = Registry.from_toml(path)
    assert r.roles("DSO") == ("dso", "operator") and r.roles("P1") == ("prosumer",)
    assert r.path == path and reg().path is None
    assert r.address("P1") == "cosmos1xyz" and r.address("DSO") is None


def test_the_grids_account_cannot_be_registered() -> None:
    """`grid` is the counterparty of every grid purchase and sale in the ledger: a
    participant of that id would be sent everyone's grid transactions as its delivery."""
    with pytest.raises(ValueError, match="'grid' is reserved"):
        Registry.from_dict({"participants": [{"id": "grid", "token": "t", "role": "prosumer"}]})
