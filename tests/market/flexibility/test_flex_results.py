"""`flex.results` comes in pages (docs/flexibility.md, *Client-to-server events*): a reply
holds at most `limit` requests offered to at most RESULTS_PAGE_PROSUMERS prosumers in all,
and paging through `next` returns every request exactly once, in request order. Bad paging
input is `invalid` and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from market.core.errors import MarketError
from market.core.protocol import decode
from market.flexibility.machine import Flexibility
from market.flexibility.messages import (
    RESULTS_PAGE,
    RESULTS_PAGE_MAX,
    RESULTS_PAGE_PROSUMERS,
    AnswerMsg,
    ContractRegisterMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    RequestMsg,
    RequestRefMsg,
    ResultsMsg,
)

T0 = 1_800_000_000
SLOT = 900
TOTALS = ("requests", "requested_wh", "expected_wh", "delivered_wh", "met", "failed", "rewards", "penalties")


def terms(aggregator: str = "AGG") -> ContractRegisterMsg:
    return ContractRegisterMsg(
        aggregator=aggregator,
        source="solar",
        production=4000,
        consumption=500,
        flex_up=2000,
        flex_down=1000,
        duration=3600,
        notice=600,
        price_up=0.3,
        price_down=0.1,
        expires=T0 + 10**7,
    )


def settled_requests(prosumers: int, requests: int, aggregators: tuple[str, ...] = ("AGG",)) -> Flexibility:
    """`requests` requests, to the aggregators in turn, each offered to all of that
    aggregator's prosumers (`prosumers` each), accepted by all, metered by every other
    prosumer and settled: every request carries deliveries, met and failed."""
    core = Flexibility(FlexConfig(slot=SLOT))
    for agg in aggregators:
        for i in range(prosumers):
            core.register(f"{agg}-site-{i:04d}", terms(agg), T0)
        core.fund("OPS", FundMsg(aggregator=agg, amount=10**14, id="budget"), T0)
    for k in range(requests):
        agg = aggregators[k % len(aggregators)]
        now = T0 + k * SLOT
        window = (now + SLOT, now + 2 * SLOT)
        ask = RequestMsg(aggregator=agg, power=100 * prosumers, start=window[0], end=window[1])
        rid = core.open_request("DSO", ask, now).request.id
        for i in range(prosumers):
            core.answer(f"{agg}-site-{i:04d}", AnswerMsg(rid, True), now)
        core.allocate(rid, now)
        for i in range(
            0, prosumers, 2
        ):  # 100 W each: 25 Wh over the baseline, met; the others never send a reading: not met
            core.meter(f"{agg}-site-{i:04d}", FlexMeterMsg(rid, window, 1025, 125), window[1])
        core.settle(agg, RequestRefMsg(rid), window[1])
    core.take_outbox()
    return core


def pages(core: Flexibility, by: str, **paging: Any) -> list[dict[str, Any]]:
    """Every page of `flex.results` for `by`, following `next` (as a client does)."""
    out = [core.results(by, decode(paging, ResultsMsg))]
    while out[-1]["next"] is not None:
        out.append(core.results(by, decode(paging | {"after": out[-1]["next"]}, ResultsMsg)))
        assert len(out) < 1000, "paging does not end"
    return out


def added(replies: list[dict[str, Any]]) -> dict[str, int]:
    return {key: sum(r["totals"][key] for r in replies) for key in TOTALS}


def test_results_come_in_pages_of_the_limit_and_return_every_request_once_in_order() -> None:
    core = settled_requests(prosumers=3, requests=150)
    first = core.results("AGG", ResultsMsg())  # `{}`: still valid, the first page
    assert len(first["requests"]) == RESULTS_PAGE == 64
    assert first["next"] == "fr64" and first["totals"]["requests"] == 64

    got = pages(core, "AGG")
    assert [len(p["requests"]) for p in got] == [64, 64, 22]
    assert [p["next"] for p in got] == ["fr64", "fr128", None]
    ids = [r["id"] for p in got for r in p["requests"]]
    assert ids == [f"fr{k}" for k in range(1, 151)]  # each once, in request order
    # The pages hold what the requests one by one hold; the totals add up to theirs.
    one_by_one = [core.results("AGG", ResultsMsg(rid)) for rid in ids]
    assert [r for p in got for r in p["requests"]] == [o["requests"][0] for o in one_by_one]
    assert added(got) == added(one_by_one)
    assert added(got)["met"] == 150 * 2 and added(got)["failed"] == 150  # sites 0 and 2 metered, 1 not
    # A larger limit: fewer pages, the same requests; the dso pages through the same.
    (whole,) = pages(core, "AGG", limit=RESULTS_PAGE_MAX)
    assert [r["id"] for r in whole["requests"]] == ids and added([whole]) == added(got)
    assert [[r["id"] for r in p["requests"]] for p in pages(core, "AGG", limit=100)] == [ids[:100], ids[100:]]
    assert pages(core, "DSO") == got
    # One request by name is one reply, as before, with `next` null.
    assert core.results("AGG", ResultsMsg("fr7"))["next"] is None


def test_each_sees_only_its_own_requests_page_by_page() -> None:
    core = settled_requests(prosumers=2, requests=9, aggregators=("AGG", "AGG2", "AGG3"))
    got = pages(core, "AGG2", limit=2)
    assert [[r["id"] for r in p["requests"]] for p in got] == [["fr2", "fr5"], ["fr8"]]
    assert [p["next"] for p in got] == ["fr5", None]
    assert [r["id"] for p in pages(core, "DSO", limit=4) for r in p["requests"]] == [f"fr{k}" for k in range(1, 10)]
    assert core.results("P1", ResultsMsg()) == {
        "requests": [],
        "totals": dict.fromkeys(TOTALS, 0),
        "next": None,
    }


def test_results_pages_stay_under_a_megabyte_at_2000_prosumers() -> None:
    # Each request offered to 2,000 prosumers is ~0.75 MB of JSON: `{}` used to answer all
    # of them in one reply of megabytes; now a page holds requests offered to at most
    # RESULTS_PAGE_PROSUMERS prosumers in all (at least one request).
    core = settled_requests(prosumers=2000, requests=3)
    got = pages(core, "AGG")
    sizes = [len(json.dumps(p)) for p in got]
    assert [len(p["requests"]) for p in got] == [1, 1, 1]
    assert max(sizes) < 1_000_000, sizes
    assert [r["id"] for p in got for r in p["requests"]] == ["fr1", "fr2", "fr3"]
    assert sum(len(r["deliveries"]) for p in got for r in p["requests"]) == 3 * 2000
    assert RESULTS_PAGE_PROSUMERS == 2000


def test_small_requests_fill_a_page_up_to_the_prosumer_bound() -> None:
    # 700 prosumers a request: two fit in 2,000 (1,400), a third would not (2,100).
    core = settled_requests(prosumers=700, requests=5)
    got = pages(core, "AGG", limit=RESULTS_PAGE_MAX)
    assert [[r["id"] for r in p["requests"]] for p in got] == [["fr1", "fr2"], ["fr3", "fr4"], ["fr5"]]
    assert all(sum(len(r["offered"]) for r in p["requests"]) <= RESULTS_PAGE_PROSUMERS for p in got)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": RESULTS_PAGE_MAX + 1}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"limit": 1.5}, "limit"),
        ({"limit": None}, "limit"),
        ({"after": 5}, "after"),
        ({"after": True}, "after"),
        ({"after": ""}, "after"),
        ({"after": ["fr1"]}, "after"),
        ({"after": "fr999"}, "unknown cursor"),
        ({"after": "fr2"}, "unknown cursor"),  # another aggregator's request: as if unknown
        ({"request": "fr1", "after": "fr1"}, "not with `request`"),
        ({"page": 2}, "page"),
        ({"cursor": "fr1"}, "cursor"),
    ],
)
def test_bad_paging_input_is_invalid_and_changes_nothing(payload: dict[str, Any], says: str) -> None:
    core = settled_requests(prosumers=2, requests=4, aggregators=("AGG", "AGG2"))
    before = msgspec.to_builtins(core.snapshot())
    with pytest.raises(MarketError) as err:
        core.results("AGG", decode(payload, ResultsMsg))
    assert err.value.code == "invalid"
    assert says in str(err.value), err.value
    assert msgspec.to_builtins(core.snapshot()) == before
    assert core.take_outbox() == ([], [])
