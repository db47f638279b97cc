"""Flexibility core (seed 001, docs/flexibility.md): strategies, delivery check, reputation,
contract and request lifecycles. Plain data in, plain data out; numbers worked by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import (
    FlexAllocationRecord,
    FlexAnswerRecord,
    FlexContractRecord,
    FlexDeliveryRecord,
    FlexReputationRecord,
    FlexRequestRecord,
    FlexTokenRecord,
)
from market.flexibility.contracts import check_delivery, energy_wh
from market.flexibility.machine import Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRefMsg,
    ContractRegisterMsg,
    ContractRenegotiateMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    ReputationRules,
    RequestMsg,
    RequestRefMsg,
    ResultsMsg,
    StrategyMsg,
)
from market.flexibility.strategies import Allocation, Candidate, FairStrategy, ReputationStrategy, Share

T0 = 1_800_000_000
SLOT = 900


def cand(pid: str, capacity: int, reputation: int = 100, price: float = 0.2, seq: int = 0) -> Candidate:
    return Candidate(pid, capacity, reputation, price, seq)


def shares(alloc: Allocation) -> list[tuple[str, int]]:
    return [(s.prosumer, s.power) for s in alloc.shares]


# -- strategies ------------------------------------------------------------------------------

FOUR = [
    cand("A", 2000, reputation=120, price=0.20, seq=1),
    cand("B", 3000, reputation=100, price=0.10, seq=2),
    cand("C", 1000, reputation=100, price=0.10, seq=3),
    cand("D", 5000, reputation=90, price=0.05, seq=4),
]


def test_fair_apportions_exactly_by_largest_remainder() -> None:
    # total 11000 W; limits (25 %) 500, 750, 250, 1250 = 2750 > 2000.
    # 2000*2000/11000 = 363 r 7000, *3000 = 545 r 5000, *1000 = 181 r 9000, *5000 = 909 r 1000:
    # floors sum to 1998; the two W left go to the largest remainders, C then A.
    alloc = FairStrategy().allocate(2000, FOUR)
    assert shares(alloc) == [("A", 364), ("B", 545), ("C", 182), ("D", 909)]
    assert (alloc.allocated, alloc.shortfall, alloc.reason, alloc.displaced) == (2000, 0, None, ())


def test_fair_stops_at_the_25_percent_modulation_and_says_why() -> None:
    alloc = FairStrategy().allocate(3000, FOUR)
    assert shares(alloc) == [("A", 500), ("B", 750), ("C", 250), ("D", 1250)]
    assert alloc.shortfall == 250
    assert (
        alloc.reason
        == "fair: accepting prosumers modulate at most 25 % of their contracted flexibility (2750 W of 11000 W)"
    )
    # Exactly the room: everyone at its limit, nothing short.
    assert FairStrategy().allocate(2750, FOUR).shortfall == 0


def test_fair_respects_limits_even_when_a_remainder_would_push_past_them() -> None:
    # X's limit is 0 (3 * 25 // 100): the leftover W must go to Y, although X's remainder is larger.
    alloc = FairStrategy().allocate(5, [cand("X", 3), cand("Y", 100)])
    assert shares(alloc) == [("Y", 5)] and alloc.displaced == ("X",)


def test_reputation_ranks_by_score_then_capacity_and_displaces_the_rest() -> None:
    # Scores = reputation - round(100 * price): A 100, B 90, C 90, D 85; B before C (more kW).
    alloc = ReputationStrategy().allocate(5500, FOUR)
    assert shares(alloc) == [("A", 2000), ("B", 3000), ("C", 500)]
    assert alloc.displaced == ("D",) and alloc.shortfall == 0


def test_reputation_price_gives_a_cheaper_newcomer_a_chance() -> None:
    veteran = cand("V", 1000, reputation=130, price=0.40)  # 130 - 40 = 90
    newcomer = cand("N", 1000, reputation=100, price=0.05)  # 100 - 5 = 95
    assert shares(ReputationStrategy().allocate(1000, [veteran, newcomer])) == [("N", 1000)]
    # Without the price, reputation alone decides.
    assert shares(ReputationStrategy(price_weight=0).allocate(1000, [veteran, newcomer])) == [("V", 1000)]


def test_reputation_shortfall_has_a_reason() -> None:
    alloc = ReputationStrategy().allocate(12000, FOUR)
    assert alloc.allocated == 11000 and alloc.shortfall == 1000
    assert alloc.reason == "reputation: accepting prosumers guarantee 11000 W in all"
    for strategy in (FairStrategy(), ReputationStrategy()):
        empty = strategy.allocate(10, [])
        assert (empty.shares, empty.shortfall, empty.reason) == ((), 10, "no prosumer accepted")


candidates_st = st.lists(
    st.builds(
        cand,
        st.from_regex(r"P[0-9]{1,3}", fullmatch=True),
        st.integers(0, 50_000),
        st.integers(0, 300),
        st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.35]),
        st.integers(0, 1000),
    ),
    max_size=30,
    unique_by=lambda c: c.prosumer,
)


@settings(max_examples=300, deadline=None)
@given(need=st.integers(1, 200_000), candidates=candidates_st)
def test_strategy_invariants(need: int, candidates: list[Candidate]) -> None:
    for strategy, cap in ((FairStrategy(), lambda c: c.capacity * 25 // 100), (ReputationStrategy(), None)):
        alloc = strategy.allocate(need, candidates)
        # sums to the request, or says why not
        assert alloc.allocated + alloc.shortfall == need
        assert (alloc.shortfall == 0) == (alloc.reason is None)
        by_id = {c.prosumer: c for c in candidates}
        for s in alloc.shares:
            assert 0 < s.power <= by_id[s.prosumer].capacity  # never above the contract
            if cap is not None:
                assert s.power <= cap(by_id[s.prosumer])  # fair: within the modulation limit
        named = [s.prosumer for s in alloc.shares] + list(alloc.displaced)
        assert sorted(named) == sorted(by_id)  # everyone accounted for once
        assert strategy.allocate(need, list(candidates)) == alloc  # deterministic
    # reputation does not depend on the order the answers came in
    assert ReputationStrategy().allocate(need, candidates[::-1]) == ReputationStrategy().allocate(need, candidates)


# -- delivery check --------------------------------------------------------------------------


def check(delivered: int, expected_power: int = 4000, baseline: int = 0, price: float = 0.2) -> Any:
    # 4000 W over 900 s: 1000 Wh expected.
    net = baseline + delivered if expected_power > 0 else baseline - delivered
    reading = (max(net, 0), max(-net, 0))
    return check_delivery(power=expected_power, seconds=900, baseline=baseline, price=price, reading=reading)


def test_delivery_margin_is_ten_percent_both_ways() -> None:
    assert energy_wh(4000, 900) == 1000 and energy_wh(333, 900) == 83 and energy_wh(-1000, 900) == -250
    assert check(900).met and check(1100).met  # exactly at the margin
    assert not check(899).met and not check(1101).met
    assert check(1000).reward == 200_000  # 1000 Wh * 0.2 per kWh = 0.2 currency
    under = check(899)
    # credited 899 Wh -> 179800 micro; penalty on the 101 Wh missed -> 20200 micro
    assert (under.credited, under.reward, under.penalty) == (899, 179_800, 20_200)
    over = check(1500)
    # over-delivery is paid up to the expected energy, and beyond the margin it is a miss too
    assert (over.credited, over.reward, over.met, over.penalty) == (1000, 200_000, False, 100_000)


def test_delivery_downward_and_against_the_baseline() -> None:
    # down 2000 W over 900 s = 500 Wh; baseline 875 Wh net export; metered 400 Wh net: 475 delivered.
    d = check_delivery(power=-2000, seconds=900, baseline=875, price=0.1, reading=(525, 125))
    assert (d.expected, d.delivered, d.met, d.reward, d.penalty) == (500, 475, True, 47_500, 0)
    # going the wrong way is negative delivery: nothing credited, penalty capped at the expected energy
    wrong = check_delivery(power=-2000, seconds=900, baseline=875, price=0.1, reading=(1475, 0))
    assert (wrong.delivered, wrong.credited, wrong.met, wrong.penalty) == (-600, 0, False, 50_000)


def test_no_reading_is_never_met() -> None:
    d = check_delivery(power=4000, seconds=900, baseline=0, price=0.2, reading=None, penalty_rate=1.5)
    assert (d.delivered, d.met, d.reward, d.penalty) == (0, False, 0, 300_000)


# -- the core: contracts ---------------------------------------------------------------------


def terms(**kw: Any) -> ContractRegisterMsg:
    base: dict[str, Any] = {
        "aggregator": "AGG",
        "source": "solar",
        "production": 4000,
        "consumption": 500,
        "flex_up": 2000,
        "flex_down": 1000,
        "duration": 3600,
        "notice": 600,
        "price_up": 0.3,
        "price_down": 0.1,
        "expires": T0 + 86400,
    }
    return decode(base | kw, ContractRegisterMsg)


def outbox(core: Flexibility) -> list[Any]:
    records, _notices = core.take_outbox()
    return records


def test_contract_lifecycle_each_a_record() -> None:
    core = Flexibility()
    c = core.register("P1", terms(), T0)["contract"]
    assert (c["id"], c["status"], c["version"]) == ("fc1", "active", 1)
    assert core.register("P1", terms(), T0 + 1) == {"contract": c, "duplicate": True}
    with pytest.raises(MarketError) as err:
        core.register("P1", terms(flex_up=1), T0)
    assert err.value.code == "conflict"

    up = core.renegotiate("P1", ContractRenegotiateMsg("fc1", flex_up=2500, expires=T0 + 2 * 86400), T0 + 10)
    assert (up["downward"], up["reputation"], up["contract"]["version"]) == (False, 100, 2)
    down = core.renegotiate("P1", ContractRenegotiateMsg("fc1", notice=900), T0 + 20)  # longer notice: downward
    assert (down["downward"], down["reputation"]) == (True, 95)
    same = core.renegotiate("P1", ContractRenegotiateMsg("fc1", notice=900), T0 + 30)
    assert same["duplicate"] is True

    with pytest.raises(MarketError) as err:
        core.cancel("P2", ContractRefMsg("fc1"), T0)  # not a party: indistinguishable from unknown
    assert err.value.code == "not_found"
    assert core.cancel("AGG", ContractRefMsg("fc1"), T0 + 40)["contract"]["status"] == "cancelled"
    with pytest.raises(MarketError) as err:
        core.renegotiate("P1", ContractRenegotiateMsg("fc1", flex_up=1), T0 + 50)
    assert err.value.code == "closed"

    again = core.register("P1", terms(expires=T0 + 1000), T0 + 60)["contract"]
    assert again["id"] == "fc2"
    assert core.expire(T0 + 999) == 0 and core.expire(T0 + 1000) == 1
    assert core.active_contract("P1") is None

    records = outbox(core)
    events = [(r.id, r.event, r.downward) for r in records if isinstance(r, FlexContractRecord)]
    assert events == [
        ("fc1.1", "registered", False),
        ("fc1.2", "renegotiated", False),
        ("fc1.3", "renegotiated", True),
        ("fc1.4", "cancelled", False),
        ("fc2.1", "registered", False),
        ("fc2.2", "expired", False),
    ]
    reps = [(r.id, r.reason, r.delta, r.score) for r in records if isinstance(r, FlexReputationRecord)]
    assert reps == [("P1.1", "renegotiation", -5, 95)]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"flex_up": 0, "flex_down": 0}, "invalid"),
        ({"expires": T0}, "invalid"),
        ({"aggregator": "P1"}, "invalid"),
    ],
)
def test_contract_refusals(payload: dict[str, Any], code: str) -> None:
    core = Flexibility()
    before = msgspec.to_builtins(core.snapshot())
    with pytest.raises(MarketError) as err:
        core.register("P1", terms(**payload), T0)
    assert err.value.code == code
    assert msgspec.to_builtins(core.snapshot()) == before


def test_wire_messages_decode_strictly() -> None:
    good = msgspec.to_builtins(terms())
    for bad in ({"flex_up": 1.5}, {"flex_up": True}, {"price_up": float("inf")}, {"duration": 0}, {"x": 1}):
        with pytest.raises(MarketError) as err:
            decode(good | bad, ContractRegisterMsg)
        assert err.value.code == "invalid"
    with pytest.raises(MarketError):
        decode({"request": "fr1", "accept": "yes"}, AnswerMsg)


# -- the core: requests ----------------------------------------------------------------------


def ask(power: int = 1000, start: int = T0 + 900, end: int = T0 + 1800, **kw: Any) -> RequestMsg:
    return RequestMsg(aggregator="AGG", power=power, start=start, end=end, **kw)


BUDGET = FundMsg(aggregator="AGG", amount=1_000_000, id="budget")  # tokens are minted, never owed


def community(**contracts: dict[str, Any]) -> Flexibility:
    core = Flexibility(FlexConfig(slot=SLOT))
    for pid, kw in contracts.items():
        core.register(pid, terms(**kw), T0)
    core.fund("OPS", BUDGET, T0)
    outbox(core)
    return core


def test_eligibility_notice_duration_expiry_direction() -> None:
    core = community(
        P1={},
        P2={"notice": 1800},  # needs more notice than 900 s
        P3={"duration": 600},  # too short for 900 s
        P4={"expires": T0 + 1700},  # ends before the window does
        P5={"flex_up": 0},  # nothing upward
        P6={"aggregator": "OTHER"},
    )
    opened = core.open_request("DSO", ask(), T0)
    assert opened.request.offered == ("P1",)
    with pytest.raises(MarketError) as err:
        core.open_request("DSO", ask(), T0)
    assert err.value.code == "unavailable"  # one request at a time
    core.allocate(opened.request.id, T0)
    assert core.open_request("DSO", ask(-500), T0).request.offered == ("P1", "P5")  # downward: P5 too


def test_request_refusals() -> None:
    core = community(P1={})
    for msg, now, code in (
        (ask(start=T0 + 100), T0, "invalid"),  # misaligned
        (ask(start=T0 + 1800, end=T0 + 900), T0, "invalid"),
        (ask(end=T0 + 900 + 2 * 86400), T0, "invalid"),  # longer than max_window
        (ask(), T0 + 901, "closed"),  # already started
        (ask(0), T0, "invalid"),
    ):
        with pytest.raises(MarketError) as err:
            core.open_request("DSO", msg, now)
        assert err.value.code == code, msg
    assert core.requests() == []


def test_answers_deadline_and_silence() -> None:
    core = community(P1={}, P2={}, P3={})
    rid = core.open_request("DSO", ask(), T0).request.id
    assert core.pending(rid) == ["P1", "P2", "P3"]
    core.answer("P1", AnswerMsg(rid, True), T0)
    assert core.answer("P1", AnswerMsg(rid, True), T0)["duplicate"] is True
    with pytest.raises(MarketError) as err:
        core.answer("P1", AnswerMsg(rid, False), T0)
    assert err.value.code == "conflict"
    core.answer("P2", AnswerMsg(rid, False), T0)
    assert core.pending(rid) == ["P3"]
    with pytest.raises(MarketError) as err:
        core.answer("P9", AnswerMsg(rid, True), T0)
    assert err.value.code == "not_found"
    reply = core.allocate(rid, T0)["request"]
    assert (reply["accepted"], reply["declined"], reply["silent"]) == (["P1"], ["P2"], ["P3"])
    with pytest.raises(MarketError) as err:
        core.answer("P3", AnswerMsg(rid, True), T0)  # too late
    assert err.value.code == "closed"
    answers = [(r.id, r.answer) for r in outbox(core) if isinstance(r, FlexAnswerRecord)]
    assert answers == [("fr1.P1", "accept"), ("fr1.P2", "decline"), ("fr1.P3", "silent")]


def test_busy_prosumers_are_not_offered_overlapping_windows() -> None:
    core = community(P1={}, P2={})
    rid = core.open_request("DSO", ask(), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.allocate(rid, T0)  # P1 holds 500 W (fair, alone: its 25 % limit) over [T0+900, T0+1800]
    overlapping = core.open_request("DSO", ask(start=T0 + 900, end=T0 + 2700), T0).request
    assert overlapping.offered == ("P2",)
    core.allocate(overlapping.id, T0)  # P2 stays silent: not allocated, not busy
    later = core.open_request("DSO", ask(start=T0 + 1800, end=T0 + 2700), T0).request
    assert later.offered == ("P1", "P2")  # back-to-back windows do not overlap


def test_full_cycle_tokens_reputation_and_results() -> None:
    core = community(P1={}, P2={"price_up": 0.25})
    core.set_strategy("AGG", StrategyMsg("reputation"))
    rid = core.open_request("DSO", ask(3000), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.answer("P2", AnswerMsg(rid, True), T0)
    # scores: P1 102 - 30 = 72, P2 102 - 25 = 77: P2 first (2000 W), P1 the remaining 1000 W.
    # Allocations are listed in contract order (what a restart rebuilds from the ledger).
    req = core.allocate(rid, T0)["request"]
    assert [(a["prosumer"], a["power"], a["expected_wh"]) for a in req["allocations"]] == [
        ("P1", 1000, 250),
        ("P2", 2000, 500),
    ]
    window = (T0 + 900, T0 + 1800)
    with pytest.raises(MarketError) as err:
        core.meter("P1", FlexMeterMsg(rid, window, 1000, 125), T0 + 1799)
    assert err.value.code == "invalid"
    # baseline (4000 - 500) / 4 = 875 Wh. P1 nets 1125: 250 delivered, met: 250 * 0.3 = 75000.
    assert core.meter("P1", FlexMeterMsg(rid, window, 1250, 125), T0 + 1800) == {"settled": False}
    with pytest.raises(MarketError) as err:
        core.meter("P1", FlexMeterMsg(rid, window, 1251, 125), T0 + 1800)
    assert err.value.code == "conflict"
    with pytest.raises(MarketError) as err:
        core.meter("P1", FlexMeterMsg(rid, (T0, T0 + 900), 1250, 125), T0 + 1800)
    assert err.value.code == "invalid"
    # P2 nets 1275: 400 of 500, deviation 100 > 50: missed; reward 400 * 0.25 = 100000, penalty 25000.
    assert core.meter("P2", FlexMeterMsg(rid, window, 1400, 125), T0 + 1800) == {"settled": True}
    with pytest.raises(MarketError) as err:
        core.settle("AGG", RequestRefMsg(rid), T0 + 1800)
    assert err.value.code == "closed"
    records = outbox(core)
    tokens = [(r.from_id, r.to_id, r.amount, r.reason) for r in records if isinstance(r, FlexTokenRecord)]
    assert tokens == [
        ("AGG", "P1", 75_000, "reward"),
        ("AGG", "P2", 100_000, "reward"),
        ("P2", "AGG", 25_000, "penalty"),
    ]
    # the aggregator's budget pays the rewards and gets the penalty
    assert (core.tokens("P1"), core.tokens("P2"), core.tokens("AGG")) == (75_000, 75_000, 1_000_000 - 150_000)
    assert (core.reputation("P1"), core.reputation("P2")) == (112, 92)
    kinds = {type(r) for r in records}
    assert {FlexAllocationRecord, FlexDeliveryRecord, FlexRequestRecord, FlexReputationRecord} <= kinds
    totals = core.results("AGG", ResultsMsg())["totals"]
    assert totals == {
        "requests": 1,
        "requested_wh": 750,
        "expected_wh": 750,
        "delivered_wh": 650,
        "met": 1,
        "failed": 1,
        "rewards": 175_000,
        "penalties": 25_000,
    }
    assert core.results("P1", ResultsMsg())["requests"] == []  # not a party
    with pytest.raises(MarketError):
        core.results("P1", ResultsMsg(rid))


def test_reputation_is_clamped() -> None:
    core = Flexibility(FlexConfig(reputation=ReputationRules(initial=3, renegotiation=5, ceiling=10)))
    core.register("P1", terms(), T0)
    core.renegotiate("P1", ContractRenegotiateMsg("fc1", flex_up=10), T0)
    assert core.reputation("P1") == 0
    records = [r for r in outbox(core) if isinstance(r, FlexReputationRecord)]
    assert [(r.delta, r.score) for r in records] == [(-3, 0)]  # the delta actually applied


def test_snapshot_restore_undoes_an_event() -> None:
    core = community(P1={})
    saved = core.snapshot()
    core.register("P2", terms(), T0)
    core.renegotiate("P1", ContractRenegotiateMsg("fc1", flex_up=1), T0)
    core.restore(saved)
    assert core.active_contract("P2") is None and core.reputation("P1") == 100
    assert core.take_outbox() == ([], [])
    assert core.register("P2", terms(), T0)["contract"]["id"] == "fc2"


def test_resume_from_ledger_rows_continues_ids_and_pending_settlements() -> None:
    core = community()
    core.fund("OPS", msgspec.structs.replace(BUDGET, id="more"), T0)  # in the ledger resumed from
    core.register("P1", terms(), T0)
    core.register("P2", terms(price_up=0.25), T0)
    rid = core.open_request("DSO", ask(), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.allocate(rid, T0)  # fair, P1 alone: its 25 % limit, 500 W of the 1000 W asked
    core.renegotiate("P2", ContractRenegotiateMsg("fc2", flex_up=100), T0)

    resumed = Flexibility(FlexConfig(slot=SLOT))
    resumed.resume(outbox(core))
    assert (resumed.reputation("P1"), resumed.reputation("P2")) == (102, 95)
    p2 = resumed.active_contract("P2")
    assert p2 is not None and (p2.flex_up, p2.version) == (100, 2)
    assert resumed.register("P3", terms(), T0)["contract"]["id"] == "fc3"
    # The allocation made before the restart settles after it: 500 W over 900 s = 125 Wh,
    # baseline 875 Wh, P1 nets 1000 Wh: 125 delivered, met, 125 * 0.3 = 37500 micro.
    window = (T0 + 900, T0 + 1800)
    assert resumed.meter("P1", FlexMeterMsg(rid, window, 1125, 125), T0 + 1800) == {"settled": True}
    assert (resumed.tokens("P1"), resumed.tokens("AGG"), resumed.reputation("P1")) == (37_500, 1_000_000 - 37_500, 112)
    assert resumed.open_request("DSO", ask(start=T0 + 2700, end=T0 + 3600), T0).request.id == "fr2"


def test_unknown_strategy_and_custom_strategy() -> None:
    class Everything:
        name = "everything"

        def allocate(self, need: int, candidates: Any) -> Allocation:
            got = [Share(c.prosumer, min(c.capacity, need)) for c in candidates[:1]]
            return Allocation(
                tuple(got), tuple(c.prosumer for c in candidates[1:]), need - sum(s.power for s in got), None
            )

    core = Flexibility(strategies={"fair": FairStrategy(), "everything": Everything()})
    core.fund("OPS", BUDGET, T0)
    with pytest.raises(MarketError):
        core.set_strategy("AGG", StrategyMsg("reputation"))
    assert core.set_strategy("AGG", StrategyMsg("everything")) == {"strategy": "everything"}
    core.register("P1", terms(), T0)
    core.register("P2", terms(), T0)
    rid = core.open_request("DSO", ask(1500), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.answer("P2", AnswerMsg(rid, True), T0)
    req = core.allocate(rid, T0)["request"]
    assert (req["strategy"], req["allocations"][0]["power"], req["displaced"]) == ("everything", 1500, ["P2"])


# -- restoring from the ledger ---------------------------------------------------------------


def durable(core: Flexibility) -> Any:
    """The state without what the ledger does not keep (docs/flexibility.md, State): the
    strategy choices and the readings of requests not settled yet."""
    s = core.snapshot()
    settled = {rid for rid, r in s.requests.items() if r.status == "settled"}
    readings = {k: v for k, v in s.readings.items() if k[0] in settled}
    return msgspec.structs.replace(s, strategies={}, readings=readings, records=[], notices=[])


def resumed_from(records: list[Any]) -> Flexibility:
    core = Flexibility(FlexConfig(slot=SLOT))
    core.resume(records)
    return core


def test_resume_of_the_records_written_so_far_gives_the_same_state() -> None:
    live, written, replies = Flexibility(FlexConfig(slot=SLOT)), [], {}

    def restart() -> None:
        written.extend(outbox(live))
        if live.snapshot().open_request is None:  # an open request was never acknowledged
            assert durable(resumed_from(written)) == durable(live)

    def request(name: str, msg: RequestMsg, answers: dict[str, bool | None], now: int = T0) -> None:
        rid = live.open_request("DSO", msg, now).request.id
        restart()
        for pid, yes in answers.items():
            if yes is not None:
                live.answer(pid, AnswerMsg(rid, yes), now)
                restart()
        replies[name] = live.allocate(rid, now)

    window1, window2, window5 = (T0 + 900, T0 + 1800), (T0 + 1800, T0 + 2700), (T0 + 2700, T0 + 3600)
    steps: list[Callable[[], Any]] = [
        lambda: live.fund("OPS", BUDGET, T0),
        lambda: live.register("P9", terms(), T0),  # fc1: ids are not in contract order
        lambda: live.register("P1", terms(price_up=0.25), T0),  # fc2
        lambda: live.register("P3", terms(source="wind"), T0),  # fc3
        lambda: live.cancel("P3", ContractRefMsg("fc3"), T0),
        lambda: live.register("P4", terms(flex_up=500, expires=T0 + 3600), T0),  # fc4
        lambda: live.register("P3", terms(source="wind", price_up=0.2), T0),  # fc5: P3 is offered after P4
        lambda: request("fr1", ask(id="a"), {"P9": True, "P1": True, "P3": False, "P4": None}),
        lambda: live.set_strategy("AGG", StrategyMsg("reputation")),
        # reputation: P3 102 - 20 = 82, P1 102 - 25 = 77, P9 102 - 30 = 72: P3, P1 2000 W each, P9 displaced
        lambda: request("fr2", ask(4000, *window2, id="b"), {"P9": True, "P1": True, "P3": True, "P4": False}),
        lambda: live.meter("P9", FlexMeterMsg("fr1", window1, 1000, 125), T0 + 1800),  # fr1 still open
        lambda: live.meter("P1", FlexMeterMsg("fr1", window1, 1200, 125), T0 + 1800),  # settles fr1
        lambda: live.renegotiate("P1", ContractRenegotiateMsg("fc2", flex_up=1500), T0 + 1800),
        lambda: request("fr3", RequestMsg(aggregator="NOBODY", power=-100, start=T0 + 2700, end=T0 + 3600), {}),
        lambda: live.open_request("DSO", ask(500, *window5), T0 + 1800),  # fr4: answered, then abandoned
        lambda: live.answer("P4", AnswerMsg("fr4", True), T0 + 1800),
        lambda: live.abandon("fr4"),
        lambda: live.meter("P3", FlexMeterMsg("fr2", window2, 900, 0), T0 + 2700),
        lambda: live.settle("AGG", RequestRefMsg("fr2"), T0 + 2700),  # P1 never metered
        lambda: request("fr5", ask(-800, *window5, id="e"), {"P9": True, "P1": True}, now=T0 + 1800),
        lambda: live.expire(T0 + 3600),  # P4's contract
        lambda: live.register("P4", terms(flex_up=500), T0 + 3600),  # fc6: fr1 was offered to P4 by fc4
    ]
    for step in steps:
        step()
        restart()

    resumed = resumed_from(written)
    req2 = replies["fr2"]["request"]
    assert [a["prosumer"] for a in req2["allocations"]] == ["P1", "P3"] and req2["displaced"] == ["P9"]
    assert resumed.request("fr1").offered == ("P9", "P1", "P4", "P3")
    assert resumed.results("AGG", ResultsMsg()) == live.results("AGG", ResultsMsg())
    assert resumed.results("DSO", ResultsMsg()) == live.results("DSO", ResultsMsg())
    for pid in ("P1", "P3", "P4", "P9"):
        assert resumed.status(pid, "prosumer") == live.status(pid, "prosumer")
    assert resumed.status("AGG", "aggregator") == live.status("AGG", "aggregator") | {"strategy": "fair"}
    # A retried request id gets its first reply, settled since or not; a retried reading is a duplicate.
    for name, client_id in (("fr1", "a"), ("fr2", "b"), ("fr5", "e")):
        msg = next(
            m for m in (ask(id="a"), ask(4000, *window2, id="b"), ask(-800, *window5, id="e")) if m.id == client_id
        )
        first = replies[name] | {"duplicate": True}
        assert resumed.open_request("DSO", msg, T0 + 3600).duplicate == first
        assert live.open_request("DSO", msg, T0 + 3600).duplicate == first
    assert resumed.meter("P9", FlexMeterMsg("fr1", window1, 1000, 125), T0 + 3600) == {"duplicate": True}
    assert outbox(resumed) == [] and outbox(live) == []
    # The request pending at the restart settles after it exactly as it would have without one.
    (allotted,) = replies["fr5"]["request"]["allocations"]
    reading = FlexMeterMsg("fr5", window5, 3500, 900)
    assert resumed.meter(allotted["prosumer"], reading, T0 + 3600) == {"settled": True}
    assert live.meter(allotted["prosumer"], reading, T0 + 3600) == {"settled": True}
    assert outbox(resumed) == outbox(live)
    assert resumed.results("DSO", ResultsMsg("fr5")) == live.results("DSO", ResultsMsg("fr5"))
    assert resumed.open_request("DSO", ask(start=T0 + 4500, end=T0 + 5400), T0 + 3600).request.id == "fr6"


def test_resume_refuses_rows_that_do_not_fit_and_changes_nothing() -> None:
    core = community(P1={})
    rid = core.open_request("DSO", ask(), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.allocate(rid, T0)
    records = outbox(core)
    target = community(P2={})
    before = durable(target)
    no_answer = [r for r in records if not isinstance(r, FlexAnswerRecord)]
    with pytest.raises(ValueError, match="not offered"):
        target.resume(no_answer)
    bad = [msgspec.structs.replace(r, answer="maybe") if isinstance(r, FlexAnswerRecord) else r for r in records]
    with pytest.raises(ValueError, match="unknown answer"):
        target.resume(bad)
    assert durable(target) == before
