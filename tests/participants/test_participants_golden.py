"""Pins the prosumers' behaviour: the exact meters, orders and bills of a scripted market
(tests/participants/golden_scenario.py: 20 synthetic specs, three runs of 96+ rounds in
UTC, Europe/Berlin across the DST switch and America/New_York, sim and rt mode, fills,
replays, deliveries, a jump ahead and a reset).

GOLDEN was computed on the code BEFORE the CPU optimizations of the participants package
(per-day vectorized profiles, lazy trader generators, O(expired) forgetting) and must not
change: same seed -> byte-identical outputs. If it does, the change altered behaviour.
(The synthetic profiles use numpy's transcendental functions, so a different numpy build
or CPU family could, in principle, move a value by one ulp and a rounded Wh with it.)
"""

from tests.participants import golden_scenario

GOLDEN = "ae0a663fb34034ed0fd0e95c8e7abc2fdd64324dc68220df8980952253c5ca33"


def test_prosumer_outputs_are_unchanged() -> None:
    out = golden_scenario.run()
    assert len(out) == 6020
    assert golden_scenario.digest(out) == GOLDEN
