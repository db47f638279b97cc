"""`microte flexsim --transport socket` (issue #20 item 1): the seed 001 simulation through a
real `microte market` subprocess and its ledger, the prosumers as socket.io agents in two
processes of their own, gives the in-process run's report and the same flexibility ledger."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from controller.flexsim import FLEX_TABLES, FlexSimParams, flex_digest, run_async, socket_compatible
from ledger import ledger_digest, read_rows
from market.flexibility.messages import FlexConfig

# A small world that still has it all: joins over time, renegotiations, requests beyond the
# budget (it runs out), silent prosumers, missing readings, the forecast.
PARAMS = FlexSimParams(
    seed=3,
    prosumers=12,
    initial=4,
    days=0.5,
    join_rate=4.0,
    request_rate=2.0,
    renegotiation_rate=1.0,
    answer_within=0.5,
    forecast=True,
    budget=3.0,
    answer_silent=0.1,
    meter_missing=0.1,
)


async def test_socket_run_gives_the_inproc_report_and_the_same_ledger(tmp_path: Path) -> None:
    inproc, no_load = await run_async(PARAMS, ledger_dir=tmp_path)
    socket, loads = await run_async(PARAMS, transport="socket", workers=2, ledger_dir=tmp_path)
    assert no_load == ()
    assert socket == inproc  # every figure, and the digest of every flex_* table
    for r in socket.results:
        assert r.records > 0 and r.requests > 0 and r.budget_requests > 0 and r.min_balance >= 0
        rows = {}
        for transport in ("inproc", "socket"):
            url = f"sqlite:///{tmp_path / f'flexsim-{transport}-{r.strategy}.db'}"
            rows[transport] = {t: read_rows(url, t) for t in FLEX_TABLES}
            assert flex_digest(rows[transport]) == r.digest
        assert rows["socket"] == rows["inproc"]  # row for row, the market time in every `time`
        # the auction's tables (`microte ledger digest`) hold nothing in either
        inproc_db, socket_db = (f"sqlite:///{tmp_path / f'flexsim-{t}-{r.strategy}.db'}" for t in ("inproc", "socket"))
        assert ledger_digest(inproc_db) == ledger_digest(socket_db)
    for load in loads:
        assert load.workers == 2 and load.prosumers == 12
        assert load.refused == {}  # no answer came after its deadline: the runs are comparable
        assert load.acks["flex.answer"].n > 0 and load.acks["flex.meter"].n > 0 and load.silent > 0


def test_socket_refuses_settings_the_server_does_not_take() -> None:
    socket_compatible(PARAMS)
    with pytest.raises(ValueError, match=r"flex\.margin_pct"):
        socket_compatible(msgspec.structs.replace(PARAMS, flex=FlexConfig(margin_pct=20)))
