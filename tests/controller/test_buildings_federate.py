"""The buildings federate's pure parts: strict `[cosim.buildings]` decoding, bus assignment,
the coordinator target rule and the values it publishes per slot."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import numpy as np
import pytest

from controller import buildings_federate as bld
from controller import cosim
from controller.scenario import Scenario, load_scenario
from participants.pem import simulate
from participants.thermal import houses
from participants.weather import Conditions

FEEDER = Path(__file__).parents[2] / "scenarios" / "feeder.toml"


def scenario(cosim_tables: dict, step: int = 900) -> Scenario:
    return Scenario(step=step, cosim=cosim_tables)


def test_no_table_means_no_buildings_federate_and_the_defaults_are_documented() -> None:
    assert bld.buildings_config(scenario({}), "s.toml") is None
    cfg = bld.buildings_config(scenario({"buildings": {}}), "s.toml")
    assert cfg == bld.BuildingsConfig(houses=30, seed_offset=0, mode="pem", dt=60, packet_seconds=300, buses=[])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"buildings": {"houses": 4, "colour": "red"}}, r"s.toml: \[cosim.buildings\]: .*unknown field `colour`"),
        ({"buildings": {"mode": "smart"}}, r"\[cosim.buildings\]: Invalid enum value 'smart' - at `\$.mode`"),
        ({"buildings": {"houses": 0}}, r"\[cosim.buildings\]: Expected `int` >= 1 - at `\$.houses`"),
        ({"buildings": {"dt": "60"}}, r"Expected `int`, got `str` - at `\$.dt`"),
        ({"buildings": {"dt": 7}}, r"dt = 7 does not divide the slot \(900 s\)"),
        ({"building": {}}, r"unknown table\(s\) \[cosim.building\] \(known: \[cosim.buildings\]\)"),
    ],
)
def test_a_bad_table_exits_naming_what_is_wrong(table: dict, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bld.buildings_config(scenario(table), "s.toml")


def test_the_scenario_file_carries_the_table_and_cosim_counts_the_fourth_federate(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(FEEDER.read_text() + "\n[cosim.buildings]\nhouses = 3\nbuses = ['loadbus_1_1', 5]\n")
    sc = load_scenario(path)  # the server loads the same file: the table must not be refused
    assert sc.cosim == {"buildings": {"houses": 3, "buses": ["loadbus_1_1", 5]}}
    opts = cosim.Options(scenario=str(path))
    assert cosim.kinds_of(opts) == ["market", "grid", "weather", "buildings"]
    assert cosim.kinds_of(msgspec.structs.replace(opts, buildings=False, weather=False)) == ["market", "grid"]
    assert cosim.kinds_of(cosim.Options(scenario=str(FEEDER))) == ["market", "grid", "weather"]


def test_houses_go_round_robin_over_buses_that_carry_a_participant() -> None:
    assert bld.default_buses([3, 5, 5, 7, 9], hosts={9, 5, 3}) == [3, 5, 9]  # load order, once each
    assert bld.assign_buses(5, [3, 5], hosts={3, 5}) == [3, 5, 3, 5, 3]
    assert bld.assign_buses(0, [], hosts=set()) == []
    with pytest.raises(ValueError, match=r"bus\(es\) \[7\] carry no market participant"):
        bld.assign_buses(2, [3, 7], hosts={3})
    with pytest.raises(ValueError, match="no bus for the houses"):
        bld.assign_buses(2, [], hosts={3})


def test_house_buses_on_the_feeder_default_and_by_name() -> None:
    sc = load_scenario(FEEDER)
    default = bld.house_buses(sc, bld.BuildingsConfig(houses=10), FEEDER.parent)
    assert default == [3, 5, 7, 9, 11, 13, 15, 17, 3, 5]  # the 8 load buses of the Kerber feeder
    named = bld.house_buses(sc, bld.BuildingsConfig(houses=3, buses=["loadbus_2_2", 3]), FEEDER.parent)
    assert named == [17, 3, 17]
    with pytest.raises(ValueError, match="no bus 4000"):
        bld.house_buses(sc, bld.BuildingsConfig(houses=1, buses=[4000]), FEEDER.parent)
    with pytest.raises(ValueError, match=r"bus\(es\) \[2\] carry no market participant"):
        bld.house_buses(sc, bld.BuildingsConfig(houses=1, buses=[2]), FEEDER.parent)  # a cable junction


def test_the_target_is_the_rating_share_left_after_the_forecast_import() -> None:
    assert bld.target_w(63_000, 1.0, 20_000) == 43_000
    assert bld.target_w(63_000, 0.5, 40_000) == 0.0  # floored: the market alone uses more
    assert bld.target_w(63_000, 1.0, -10_000) == 73_000  # PV export: the houses take it first
    assert bld.target_w(63_000, 1.0, None) == 0.0  # a forecast that did not converge leaves nothing
    assert bld.target_w(63_000, 1.0, math.nan) == 0.0


def test_a_target_counts_only_for_its_own_slot() -> None:
    msg = {"time_delivery": [900, 1800], "target_w": 5000}
    assert bld.slot_target(msg, 900) == 5000.0
    assert bld.slot_target(msg, 1800) is None
    assert bld.slot_target(None, 900) is None


class Flat:
    def at(self, t: float | np.ndarray) -> Conditions:
        t = np.asarray(t, dtype=float)
        return Conditions(np.full(t.shape, 33.0), np.full(t.shape, 800.0), np.zeros(t.shape))


def test_slot_values_sum_the_houses_energy_per_bus_exactly_and_are_deterministic() -> None:
    h = houses(5, 11)
    start, end = 900 * 100, 900 * 101
    traj = simulate(h, Flat(), start, end, 60, "pem", 9000.0, seed=11)
    values = bld.slot_values(traj, [3, 5, 3, 7, 5], start, end, 9000.0)
    again = bld.slot_values(
        simulate(h, Flat(), start, end, 60, "pem", 9000.0, seed=11), [3, 5, 3, 7, 5], start, end, 9000.0
    )
    assert values == again
    ws = traj.hvac_w.sum(axis=1) * 60
    assert values["energy_wh"] == {
        "3": round((ws[0] + ws[2]) / 3600, 6),
        "5": round((ws[1] + ws[4]) / 3600, 6),
        "7": round(ws[3] / 3600, 6),
    }
    assert sum(values["load_w"].values()) == pytest.approx(traj.hvac_w.sum() * 60 / 900, abs=0.01)
    assert values["peak_w"] == int(traj.load_w.max()) > 0
    assert (values["requested"], values["accepted"]) == (int(traj.requested.sum()), int(traj.accepted.sum()))
    assert values["time_delivery"] == [start, end] and values["target_w"] == 9000.0
