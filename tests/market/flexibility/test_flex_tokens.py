"""Flexibility tokens behave like the seed's ERC20 accounting (docs/flexibility.md, *Tokens*):
an aggregator's budget is minted explicitly (`flex.fund`), allocations reserve the rewards
they may cost, a transfer that would overdraw is refused and changes nothing, penalties are
collected up to what the prosumer holds, and no balance is ever negative. (And the cheap
savepoint the namespace undoes a failed write with restores the state exactly.)"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import FlexTokenRecord
from market.flexibility.machine import Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRegisterMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    RequestMsg,
    RequestRefMsg,
    StrategyMsg,
    TransferMsg,
)

T0 = 1_800_000_000
SLOT = 900


def terms(**kw: Any) -> ContractRegisterMsg:
    base: dict[str, Any] = {
        "aggregator": "AGG",
        "source": "bess",
        "production": 0,
        "consumption": 500,
        "flex_up": 2000,
        "flex_down": 2000,
        "duration": 3600,
        "notice": 600,
        "price_up": 0.3,
        "price_down": 0.1,
        "expires": T0 + 30 * 86400,
    }
    return decode(base | kw, ContractRegisterMsg)


def ask(power: int, start: int = T0 + 900, end: int = T0 + 1800) -> RequestMsg:
    return RequestMsg(aggregator="AGG", power=power, start=start, end=end)


def tokens_of(core: Flexibility, *pids: str) -> tuple[int, ...]:
    return tuple(core.tokens(p) for p in pids)


def test_no_balance_goes_negative_when_nobody_funded_the_aggregator() -> None:
    # The seed's accounting: tokens are assigned by a contract that holds them. Before the
    # fix the aggregator paid rewards it never had (-225,950 in flexsim) and a prosumer
    # without tokens paid a penalty (-4,300).
    core = Flexibility(FlexConfig(slot=SLOT))
    core.register("P1", terms(), T0)
    core.register("P2", terms(), T0)
    rid = core.open_request("DSO", ask(2000), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.answer("P2", AnswerMsg(rid, True), T0)
    core.allocate(rid, T0)
    window = (T0 + 900, T0 + 1800)
    for pid in ("P1", "P2"):
        with contextlib.suppress(MarketError):  # not allocated: nothing to meter
            core.meter(pid, FlexMeterMsg(rid, window, 0, 125), T0 + 1800)  # nothing delivered: penalty
    if core.request(rid).status != "settled":
        core.settle("AGG", RequestRefMsg(rid), T0 + 1800)
    assert min(tokens_of(core, "AGG", "P1", "P2")) >= 0


def test_fund_transfer_duplicates_and_an_overdraw_refused_changing_nothing() -> None:
    core = Flexibility()
    got = core.fund("OPS", FundMsg(aggregator="AGG", amount=1_000_000, id="budget-1"), T0)
    assert got == {"fund": {"aggregator": "AGG", "amount": 1_000_000, "id": "budget-1"}, "tokens": 1_000_000}
    again = core.fund("OPS", FundMsg(aggregator="AGG", amount=1_000_000, id="budget-1"), T0 + 5)
    assert again == got | {"duplicate": True}
    with pytest.raises(MarketError) as err:
        core.fund("OPS", FundMsg(aggregator="AGG", amount=5, id="budget-1"), T0)
    assert err.value.code == "conflict"
    sent = core.transfer("AGG", TransferMsg(to="P1", amount=400_000, id="t1"), T0)
    assert sent == {"transfer": {"from": "AGG", "to": "P1", "amount": 400_000, "id": "t1"}, "tokens": 600_000}
    assert tokens_of(core, "AGG", "P1") == (600_000, 400_000) and core.supply() == 1_000_000
    before = msgspec.to_builtins(core.snapshot())
    for sender, msg in (
        ("P1", TransferMsg(to="P2", amount=400_001, id="t2")),  # more than it holds
        ("P2", TransferMsg(to="P1", amount=1, id="t3")),  # holds nothing
        ("P1", TransferMsg(to="P1", amount=1, id="t4")),  # to itself
    ):
        with pytest.raises(MarketError) as err:
            core.transfer(sender, msg, T0)
        assert err.value.code == "invalid"
    with pytest.raises(MarketError) as err:
        core.transfer("P1", TransferMsg(to="P2", amount=400_001, id="t2"), T0)
    assert "insufficient tokens: P1 holds 400000" in err.value.message
    assert msgspec.to_builtins(core.snapshot()) == before  # refused: nothing changed
    records, notices = core.take_outbox()
    rows = [(r.id, r.from_id, r.to_id, r.amount, r.reason) for r in records if isinstance(r, FlexTokenRecord)]
    assert rows == [
        ("fund/AGG/budget-1", "", "AGG", 1_000_000, "fund"),  # minted: from nobody
        ("transfer/AGG/t1", "AGG", "P1", 400_000, "transfer"),
    ]
    assert [(p, e) for p, e, _ in notices] == [("AGG", "flex.tokens"), ("P1", "flex.tokens")]
    resumed = Flexibility()
    resumed.resume(records)
    assert tokens_of(resumed, "AGG", "P1") == (600_000, 400_000) and resumed.supply() == 1_000_000
    assert resumed.fund("OPS", FundMsg(aggregator="AGG", amount=1_000_000, id="budget-1"), T0)["duplicate"] is True
    assert resumed.transfer("AGG", TransferMsg(to="P1", amount=400_000, id="t1"), T0)["duplicate"] is True
    assert resumed.status("OPS", "operator") == {"supply": 1_000_000, "balances": {"AGG": 600_000, "P1": 400_000}}


def test_allocations_reserve_their_rewards_and_are_cut_to_the_budget() -> None:
    core = Flexibility(FlexConfig(slot=SLOT))
    core.register("P1", terms(price_up=0.30), T0)
    core.register("P2", terms(price_up=0.25), T0)
    core.fund("OPS", FundMsg(aggregator="AGG", amount=150_000, id="f"), T0)
    core.set_strategy("AGG", StrategyMsg("reputation"))
    rid = core.open_request("DSO", ask(3000), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.answer("P2", AnswerMsg(rid, True), T0)
    # Scores P2 102 - 25 = 77, P1 102 - 30 = 72: P2 first, its 2000 W = 500 Wh at 0.25 costs at
    # most 125,000 micro; 25,000 are left: P1's 1000 W would cost 75,000. The most it can pay
    # for: 83 Wh at 0.30 = 24,900 micro, i.e. 333 W over 900 s ((333 * 900 + 1800) // 3600 = 83).
    req = core.allocate(rid, T0)["request"]
    assert [(a["prosumer"], a["power"]) for a in req["allocations"]] == [("P1", 333), ("P2", 2000)]
    assert (req["allocated"], req["shortfall"]) == (2333, 667)
    assert req["reason"] == "budget: AGG has 150000 micro available, which pays for 2333 W of the 3000 W allocated"
    status = core.status("AGG", "aggregator")
    assert (status["tokens"], status["reserved"], status["available"]) == (150_000, 149_900, 100)
    with pytest.raises(MarketError) as err:  # reserved tokens cannot be transferred
        core.transfer("AGG", TransferMsg(to="P1", amount=101, id="x"), T0)
    assert err.value.code == "invalid" and "149900 reserved" in err.value.message
    # P2 delivers its 500 Wh: paid 125,000. P1 sends nothing: not met, penalty 83 Wh * 0.30 =
    # 24,900 micro assessed, but P1 holds nothing: nothing collected, no token row.
    window = (T0 + 900, T0 + 1800)
    core.meter("P2", FlexMeterMsg(rid, window, 500, 125), T0 + 1800)
    settled = core.settle("AGG", RequestRefMsg(rid), T0 + 1800)["request"]
    by = {d["prosumer"]: d for d in settled["deliveries"]}
    assert (by["P1"]["penalty"], by["P1"]["penalty_paid"], by["P2"]["reward"]) == (24_900, 0, 125_000)
    assert (settled["penalties"], settled["penalties_paid"]) == (24_900, 0)
    assert tokens_of(core, "AGG", "P1", "P2") == (25_000, 0, 125_000)
    assert core.status("AGG", "aggregator")["reserved"] == 0


def test_a_penalty_is_collected_up_to_what_the_prosumer_holds() -> None:
    # The worked example's P2: reward 12,500, penalty 29,250: it pays back what it holds.
    core = Flexibility(FlexConfig(slot=SLOT))
    core.register("P1", terms(source="solar", production=4000, flex_up=2000, flex_down=1000, price_up=0.30), T0)
    core.register("P2", terms(consumption=1000, flex_up=4000, flex_down=4000, price_up=0.25), T0)
    core.fund("OPS", FundMsg(aggregator="AGG", amount=1_000_000, id="f"), T0)
    rid = core.open_request("DSO", ask(1000), T0).request.id
    core.answer("P1", AnswerMsg(rid, True), T0)
    core.answer("P2", AnswerMsg(rid, True), T0)
    core.allocate(rid, T0)
    window = (T0 + 900, T0 + 1800)
    core.meter("P1", FlexMeterMsg(rid, window, 1080, 125), T0 + 1800)
    core.meter("P2", FlexMeterMsg(rid, window, 0, 200), T0 + 1800)
    records, _ = core.take_outbox()
    rows = [(r.id, r.from_id, r.to_id, r.amount) for r in records if isinstance(r, FlexTokenRecord)]
    assert rows[1:] == [
        ("fr1.P1.reward", "AGG", "P1", 24_000),
        ("fr1.P2.reward", "AGG", "P2", 12_500),
        ("fr1.P2.penalty", "P2", "AGG", 12_500),  # 29,250 assessed, 12,500 held
    ]
    assert tokens_of(core, "AGG", "P1", "P2") == (1_000_000 - 24_000, 24_000, 0)
    resumed = Flexibility(FlexConfig(slot=SLOT))
    resumed.resume(records)
    d = resumed.delivery(rid, "P2")
    assert d is not None and (d.check.penalty, d.penalty_paid) == (29_250, 12_500)
    assert tokens_of(resumed, "AGG", "P1", "P2") == tokens_of(core, "AGG", "P1", "P2")


# -- any sequence of operations: no negative balance, tokens conserved, refusals change nothing --

PROSUMERS = ("P1", "P2", "P3")
ACCOUNTS = ("AGG", "DSO", *PROSUMERS)

ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("fund"), st.integers(1, 400_000)),
        st.tuples(st.just("transfer"), st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS), st.integers(1, 300_000)),
        st.tuples(
            st.just("request"),
            st.integers(-6000, 6000).filter(bool),
            st.sampled_from(["fair", "reputation"]),
            st.lists(st.sampled_from([True, False, None]), min_size=3, max_size=3),
        ),
        st.tuples(st.just("meter"), st.sampled_from(PROSUMERS), st.integers(0, 3000), st.integers(0, 3000)),
        st.tuples(st.just("settle")),
        st.tuples(st.just("advance")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops_st)
def test_no_sequence_of_operations_overdraws_an_account(ops: list[tuple[Any, ...]]) -> None:
    core = Flexibility(FlexConfig(slot=SLOT))
    core.register("P1", terms(price_up=0.30, price_down=0.2), T0)
    core.register("P2", terms(source="solar", production=3000, flex_up=500, price_up=0.25), T0)
    core.register("P3", terms(source="wind", production=2000, flex_up=300, flex_down=1500, price_up=0.9), T0)
    now, funded, ids = T0, 0, 0
    for op in ops:
        before = msgspec.to_builtins(core.snapshot())
        point = core.savepoint()  # what the namespace undoes an event to if its write fails
        ids += 1
        try:
            if op[0] == "fund":
                core.fund("OPS", FundMsg(aggregator="AGG", amount=op[1], id=f"f{ids}"), now)
                funded += op[1]
            elif op[0] == "transfer":
                core.transfer(op[1], TransferMsg(to=op[2], amount=op[3], id=f"t{ids}"), now)
            elif op[0] == "request":
                core.set_strategy("AGG", StrategyMsg(op[2]))
                rid = core.open_request("DSO", ask(op[1], now + SLOT, now + 2 * SLOT), now).request.id
                for pid, yes in zip(PROSUMERS, op[3], strict=True):
                    if yes is not None and pid in core.request(rid).offered:
                        core.answer(pid, AnswerMsg(rid, yes), now)
                core.allocate(rid, now)
            elif op[0] == "advance":
                now += SLOT
                core.expire(now)
            else:
                open_ = [r for r in core.requests() if r.status == "allocated" and r.end <= now]
                if not open_:
                    continue
                r = open_[0]
                if op[0] == "settle":
                    core.settle("AGG", RequestRefMsg(r.id), now)
                else:
                    core.meter(op[1], FlexMeterMsg(r.id, (r.start, r.end), op[2], op[3]), now)
        except MarketError:
            assert msgspec.to_builtins(core.snapshot()) == before  # a refusal changes nothing
        after = core.snapshot()
        core.rollback(point)
        assert msgspec.to_builtins(core.snapshot()) == before  # undone completely
        core.restore(after)
        balances = {p: core.tokens(p) for p in ACCOUNTS}
        assert min(balances.values()) >= 0, (op, balances)
        assert core.tokens("AGG") >= core.status("AGG", "aggregator")["reserved"]
        assert sum(balances.values()) == core.supply() == funded  # minted tokens are all somewhere
