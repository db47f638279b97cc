"""What the run report reads from a ledger, aggregated in the database.

Every query groups in SQL (SQLAlchemy Core: the same statements on SQLite and PostgreSQL)
by slot, participant, request, LEM or KPI, and returns numpy arrays or small structs: a
ledger of a year and 1,000 participants is never loaded row by row into Python. The one
table read row by row is `meters`, whose energies are JSON text: it is streamed in chunks
of `CHUNK` rows and folded into per-slot and per-participant sums as it comes.

The definitions are controller/report.py's (`P2P_KINDS`, `metered`, `grid_only_amount`,
`Summary`, `Bill`): `LedgerData.summary()` is the Summary that `summarize` computes from
the same ledger's rows (tests/controller/test_run_report.py checks both agree).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from controller.grid_view import SlotRow, slot_table
from controller.report import P2P_KINDS, Bill, Reading, Summary, grid_only_amount, metered
from ledger.schema import TABLE_MAP
from market.core.grid import GridTariff
from market.core.records import GRID_ID

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

# The transaction kinds that move energy, in the order the energy mix stacks them; `financial`
# rows move money only (a shortfall paid back, an unused purchase) and are not energy.
ENERGY_KINDS = ("self", "p2p", "bess_compensation", "grid_buy", "grid_sell")
KINDS = (*ENERGY_KINDS, "financial")
CHUNK = 20_000  # meter rows per fetch
MAX_CACHED = 200_000  # distinct meter readings remembered (parsed once) before starting over
MAX_SLOTS = 5_000_000  # a slot axis longer than this is not a ledger of slots (~140 years of 15 min)

# The tables whose rows make a ledger worth reporting; a database with none of them is not a
# microte ledger, one whose tables are all empty is an empty ledger.
REPORTED = (
    "transactions",
    "settlements",
    "meters",
    "rounds",
    "grid_flows",
    "grid_states",
    "flex_requests",
    "flex_tokens",
    "lem_results",
    "token_transfers",
    "slas",
    "sla_results",
)


class NotALedger(LookupError):
    """The database holds no microte ledger, or an empty one."""


def _t(name: str) -> sa.Table:
    return TABLE_MAP[name]


def _isum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """SUM of integers as a 64-bit integer (PostgreSQL's SUM(bigint) is numeric)."""
    return sa.cast(sa.func.coalesce(sa.func.sum(column), 0), sa.BigInteger)


def _fsum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[float]:
    return sa.cast(sa.func.coalesce(sa.func.sum(column), 0.0), sa.Float)


def _count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
    return _isum(sa.case((condition, 1), else_=0))


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """The ledger's `runs` rows (one per market start) and its `rounds` count."""

    runs: int
    scenario: str
    seed: int | None
    mode: str
    timezone: str
    duration: int | None  # slot length in seconds (the last run's market setting)
    pricing: str
    tariff: GridTariff | None  # the last run's grid tariff; None: the ledger has no runs row
    tariffs_differ: bool  # runs with different tariffs (the grid-only bills use the last one)
    rounds: int


def read_run(conn: sa.Connection, present: set[str]) -> Run:
    runs: list[Any] = []
    if "runs" in present:
        t = _t("runs")
        runs = list(conn.execute(sa.select(t.c.scenario, t.c.seed, t.c.config).order_by(t.c.started, t.c.id)))
    rounds = 0
    if "rounds" in present:
        rounds = int(conn.execute(sa.select(sa.func.count()).select_from(_t("rounds"))).scalar_one())
    if not runs:
        return Run(0, "", None, "", "UTC", None, "", None, False, rounds)
    configs = [json.loads(r.config or "{}") for r in runs]
    last = configs[-1]
    tariffs = {json.dumps(c.get("grid"), sort_keys=True) for c in configs}
    tariff = msgspec.convert(last["grid"], GridTariff) if "grid" in last else None
    return Run(
        runs=len(runs),
        scenario=str(runs[-1].scenario or ""),
        seed=int(runs[-1].seed),
        mode=str(last.get("mode", "")),
        timezone=str(last.get("timezone", "UTC")),
        duration=int(last["duration"]) if "duration" in last else None,
        pricing=str(last.get("pricing", "")),
        tariff=tariff,
        tariffs_differ=len(tariffs) > 1,
        rounds=rounds,
    )


# -- per slot ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slots:
    """One entry per delivery slot, on a regular axis from the first slot to the last
    (slots with nothing in the ledger are zeros, and NaN prices)."""

    start: Ints
    duration: int
    energy: dict[str, Ints]  # Wh per slot for each kind of KINDS (transactions.quantity)
    fills: Ints  # settlements per slot
    settled: Ints  # Wh settled per slot (settlements.quantity)
    price_buy: Floats  # volume-weighted price the buyers pay per kWh (NaN: no fill)
    price_sell: Floats  # ... the sellers receive
    price_low: Floats  # the lowest and highest buyer price of the slot's fills
    price_high: Floats
    grid_buy: Floats  # the grid's buy and sell price per kWh
    grid_sell: Floats
    imported: Ints  # Wh the participants imported (meters: consumption.other.external)
    load: Ints  # Wh they consumed (meters: all of consumption.other)
    charged: Ints  # Wh their batteries charged from their own generation (meters: consumption.bess)
    metered: Ints  # meter readings per slot

    @property
    def end(self) -> Ints:
        return self.start + self.duration

    def __len__(self) -> int:
        return len(self.start)

    @property
    def p2p(self) -> Ints:
        """Wh delivered between neighbours (P2P_KINDS)."""
        return sum((self.energy[k] for k in P2P_KINDS), np.zeros(len(self), np.int64))


@dataclass
class _MeterSums:
    by_slot: dict[int, list[int]] = field(default_factory=dict)  # slot -> [imported, load, charged, readings]
    grid_only: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    participants: set[str] = field(default_factory=set)


def _read_meters(conn: sa.Connection, tariff: GridTariff | None) -> _MeterSums:
    """One streamed pass over `meters`: controller.report's `metered` per row, summed per
    slot, and the grid-only bill per participant (the tariff's prices of the row's slot)."""
    out = _MeterSums()
    m = _t("meters")
    query = sa.select(m.c.participant_id, m.c.time_interval_start, m.c.generation, m.c.consumption)
    prices: dict[int, tuple[float, float]] = {}
    readings: dict[tuple[str, str], Reading] = {}  # the same JSON recurs (night, full batteries)
    result = conn.execution_options(yield_per=CHUNK).execute(query)
    for participant, start, generation, consumption in result:
        r = readings.get((generation, consumption))
        if r is None:
            if len(readings) >= MAX_CACHED:
                readings.clear()
            r = readings[generation, consumption] = metered(generation, consumption)
        sums = out.by_slot.get(start)
        if sums is None:
            sums = out.by_slot[start] = [0, 0, 0, 0]
        sums[0] += r.imported
        sums[1] += r.load
        sums[2] += r.charged
        sums[3] += 1
        out.participants.add(participant)
        if tariff is not None:
            price = prices.get(start)
            if price is None:
                price = prices[start] = tariff.prices(start)
            out.grid_only[participant] += grid_only_amount(r.imported, r.exported, *price)
    return out


def _slot_axis(starts: set[int], duration: int) -> Ints:
    if not starts:
        return np.zeros(0, np.int64)
    first, last = min(starts), max(starts)
    n = (last - first) // duration + 1
    if n > MAX_SLOTS:
        raise NotALedger(f"slots from {first} to {last} of {duration} s: {n:,} slots, more than a ledger holds")
    return first + duration * np.arange(n, dtype=np.int64)


def _duration(conn: sa.Connection, present: set[str], run: Run) -> int:
    if run.duration:
        return run.duration
    for name, start, end in (
        ("transactions", "time_delivery_start", "time_delivery_end"),
        ("settlements", "time_delivery_start", "time_delivery_end"),
        ("meters", "time_interval_start", "time_interval_end"),
    ):
        if name in present:
            t = _t(name)
            d = conn.execute(sa.select(sa.func.min(t.c[end] - t.c[start]))).scalar()
            if d:
                return int(d)
    return 900


def read_slots(conn: sa.Connection, present: set[str], run: Run) -> tuple[Slots, _MeterSums]:
    by_kind: dict[str, dict[int, int]] = {k: {} for k in KINDS}
    observed: dict[str, dict[int, float]] = {"grid_buy": {}, "grid_sell": {}}
    if "transactions" in present:
        t = _t("transactions")
        slot = t.c.time_delivery_start
        query = sa.select(slot, t.c.kind, _isum(t.c.quantity), sa.func.max(t.c.price_buy), sa.func.max(t.c.price_sell))
        for start, kind, wh, buy, sell in conn.execute(query.group_by(slot, t.c.kind)):
            by_kind.setdefault(kind, {})[start] = int(wh)
            if kind == "grid_buy":
                observed["grid_buy"][start] = float(buy)
            elif kind == "grid_sell":
                observed["grid_sell"][start] = float(sell)
    fills: dict[int, tuple[int, int, float, float, float, float]] = {}
    if "settlements" in present:
        s = _t("settlements")
        slot = s.c.time_delivery_start
        query = sa.select(
            slot,
            sa.func.count(),
            _isum(s.c.quantity),
            _fsum(s.c.quantity * s.c.price_buy),
            _fsum(s.c.quantity * s.c.price_sell),
            sa.func.min(s.c.price_buy),
            sa.func.max(s.c.price_buy),
        ).group_by(slot)
        for start, n, wh, buy, sell, low, high in conn.execute(query):
            fills[start] = (int(n), int(wh), float(buy), float(sell), float(low), float(high))
    meters = _read_meters(conn, run.tariff) if "meters" in present else _MeterSums()
    duration = _duration(conn, present, run)
    starts = set(fills) | set(meters.by_slot)
    for values in by_kind.values():
        starts |= set(values)
    axis = _slot_axis(starts, duration)
    n = len(axis)
    first = int(axis[0]) if n else 0

    def index(keys: Any) -> Ints:
        return (np.fromiter(keys, np.int64) - first) // duration

    def ints(values: dict[int, int]) -> Ints:
        out = np.zeros(n, np.int64)
        if values:
            out[index(values.keys())] = np.fromiter(values.values(), np.int64)
        return out

    def column(i: int, nan: bool) -> npt.NDArray[Any]:
        out = np.full(n, np.nan) if nan else np.zeros(n, np.int64)
        if fills:
            out[index(fills.keys())] = [v[i] for v in fills.values()]
        return out

    fill_count, settled = column(0, False), column(1, False)
    with np.errstate(invalid="ignore", divide="ignore"):
        price_buy = np.where(settled > 0, column(2, True) / settled, np.nan)
        price_sell = np.where(settled > 0, column(3, True) / settled, np.nan)
    if run.tariff is not None:
        grid = np.array([run.tariff.prices(int(s)) for s in axis], dtype=np.float64).reshape(n, 2)
        grid_buy, grid_sell = grid[:, 0], grid[:, 1]
    else:  # no runs row: the prices the ledger's grid transactions were booked at
        grid_buy, grid_sell = np.full(n, np.nan), np.full(n, np.nan)
        for name, out in (("grid_buy", grid_buy), ("grid_sell", grid_sell)):
            if observed[name]:
                out[index(observed[name].keys())] = list(observed[name].values())
    metered_sums = meters.by_slot
    slots = Slots(
        start=axis,
        duration=duration,
        energy={k: ints(by_kind.get(k, {})) for k in KINDS},
        fills=fill_count.astype(np.int64),
        settled=settled.astype(np.int64),
        price_buy=price_buy,
        price_sell=price_sell,
        price_low=column(4, True),
        price_high=column(5, True),
        grid_buy=grid_buy,
        grid_sell=grid_sell,
        imported=ints({k: v[0] for k, v in metered_sums.items()}),
        load=ints({k: v[1] for k, v in metered_sums.items()}),
        charged=ints({k: v[2] for k, v in metered_sums.items()}),
        metered=ints({k: v[3] for k, v in metered_sums.items()}),
    )
    return slots, meters


# -- per participant ------------------------------------------------------------------------


@dataclass(frozen=True)
class Bills:
    """controller.report's `Bill` per participant, as arrays (sorted by participant id)."""

    participant: list[str]
    market: Ints  # micro-currency paid (positive) or earned (negative) in the market
    grid_only: Ints | None  # the same metered energy at the grid tariff; None: no tariff in the ledger
    p2p_bought: Ints  # Wh
    p2p_sold: Ints  # Wh

    def __len__(self) -> int:
        return len(self.participant)


def read_bills(conn: sa.Connection, present: set[str], meters: _MeterSums, tariff: GridTariff | None) -> Bills:
    """Money paid and received per participant over every transaction but `self` (grouped
    by buyer and by seller and kind), next to the grid-only bill of its readings."""
    paid: dict[str, int] = defaultdict(int)
    bought: dict[str, int] = defaultdict(int)
    sold: dict[str, int] = defaultdict(int)
    if "transactions" in present:
        t = _t("transactions")
        for who, money, wh, sign, energy in (
            (t.c.buyer_id, t.c.amount_buy, t.c.quantity, 1, bought),
            (t.c.seller_id, t.c.amount_sell, t.c.quantity, -1, sold),
        ):
            query = sa.select(who, t.c.kind, _isum(money), _isum(wh)).where(t.c.kind != "self")
            for participant, kind, amount, quantity in conn.execute(query.group_by(who, t.c.kind)):
                paid[participant] += sign * int(amount)
                if kind in P2P_KINDS:
                    energy[participant] += int(quantity)
    people = sorted((set(paid) | meters.participants) - {GRID_ID})

    def array(values: dict[str, int]) -> Ints:
        return np.array([values.get(p, 0) for p in people], dtype=np.int64)

    return Bills(
        participant=people,
        market=array(paid),
        grid_only=array(meters.grid_only) if tariff is not None else None,
        p2p_bought=array(bought),
        p2p_sold=array(sold),
    )


# -- grid states and feeder power flows -----------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """controller.grid_report's rows per slot (state, power flow results, P2P and prices
    filled in from `Slots`), and what the ledger holds of each."""

    rows: list[SlotRow]
    flows: int  # grid_flows rows
    states: int  # grid_states rows

    def state_counts(self) -> dict[str, int]:
        counts = {"GREEN": 0, "YELLOW": 0, "RED": 0}
        for r in self.rows:
            counts[r.state] = counts.get(r.state, 0) + 1
        return counts


def read_grid(conn: sa.Connection, present: set[str], slots: Slots) -> Grid | None:
    """grid_flows and grid_states (one row per slot and kind, or per revision: small)."""
    tables = {}
    for name in ("grid_flows", "grid_states"):
        if name in present:
            t = _t(name)
            tables[name] = [dict(r._mapping) for r in conn.execute(sa.select(*t.columns))]
    flows, states = tables.get("grid_flows", []), tables.get("grid_states", [])
    if not flows and not states:
        return None
    rows = slot_table(flows, states, (), slots=zip(slots.start.tolist(), slots.end.tolist(), strict=True))
    at = {int(s): i for i, s in enumerate(slots.start)}
    for r in rows:
        i = at.get(r.start)
        if i is None:
            continue
        r.fills = int(slots.fills[i])
        r.p2p_kwh = slots.settled[i] / 1000.0
        if slots.settled[i] > 0:
            r.p2p_price_buy, r.p2p_price_sell = float(slots.price_buy[i]), float(slots.price_sell[i])
        if not np.isnan(slots.grid_buy[i]):
            r.grid_price_buy, r.grid_price_sell = float(slots.grid_buy[i]), float(slots.grid_sell[i])
    return Grid(rows, len(flows), len(states))


# -- flexibility (flex_* tables, docs/flexibility.md) ---------------------------------------


@dataclass(frozen=True)
class Flex:
    """Requests grouped by their delivery window; delivery checks and token moves."""

    start: Ints  # window start (flex_requests.time_delivery_start)
    end: Ints
    requests: Ints  # requests per window
    requested: Ints  # W, sum of |power|
    allocated: Ints  # W
    shortfall: Ints  # W
    checked: Ints  # delivery checks (flex_deliveries) of the window's requests
    met: Ints  # ... that were met (within 10 %)
    expected: Ints  # Wh of flexibility expected
    delivered: Ints  # Wh delivered (in the request's direction)
    strategies: list[str]
    tokens: dict[str, tuple[int, int]]  # reason -> (moves, micro-currency)
    token_time: Ints  # market time of the delivery checks' token moves
    token_reward: Ints  # micro-currency rewarded at that time (reason reward)
    token_penalty: Ints


def read_flex(conn: sa.Connection, present: set[str]) -> Flex | None:
    if not _has_rows(conn, present, "flex_requests"):
        return None
    r = _t("flex_requests")
    window = (r.c.time_delivery_start, r.c.time_delivery_end)
    query = sa.select(
        *window, sa.func.count(), _isum(sa.func.abs(r.c.power)), _isum(r.c.allocated), _isum(r.c.shortfall)
    ).group_by(*window)
    rows = sorted(conn.execute(query).all())
    index = {int(row[0]): i for i, row in enumerate(rows)}
    n = len(rows)
    checked, met, expected, delivered = (np.zeros(n, np.int64) for _ in range(4))
    if "flex_deliveries" in present:
        d = _t("flex_deliveries")
        query = (
            sa.select(
                r.c.time_delivery_start, sa.func.count(), _count_if(d.c.met), _isum(d.c.expected), _isum(d.c.delivered)
            )
            .select_from(d.join(r, d.c.request_id == r.c.id))
            .group_by(r.c.time_delivery_start)
        )
        for start, c, m, e, dl in conn.execute(query):
            i = index[int(start)]
            checked[i], met[i], expected[i], delivered[i] = c, m, e, dl
    tokens: dict[str, tuple[int, int]] = {}
    times: dict[int, list[int]] = {}
    if "flex_tokens" in present:
        tk = _t("flex_tokens")
        for reason, c, amount in conn.execute(
            sa.select(tk.c.reason, sa.func.count(), _isum(tk.c.amount)).group_by(tk.c.reason)
        ):
            tokens[str(reason)] = (int(c), int(amount))
        checks = tk.c.reason.in_(("reward", "penalty"))  # what delivery checks moved (not fund, transfer)
        query = sa.select(tk.c.time, tk.c.reason, _isum(tk.c.amount)).where(checks).group_by(tk.c.time, tk.c.reason)
        for time, reason, amount in conn.execute(query):
            times.setdefault(int(time), [0, 0])[0 if reason == "reward" else 1] += int(amount)
    strategies = sorted(str(s) for s in conn.execute(sa.select(r.c.strategy).distinct()).scalars())
    order = sorted(times)
    return Flex(
        start=np.array([row[0] for row in rows], np.int64),
        end=np.array([row[1] for row in rows], np.int64),
        requests=np.array([row[2] for row in rows], np.int64),
        requested=np.array([row[3] for row in rows], np.int64),
        allocated=np.array([row[4] for row in rows], np.int64),
        shortfall=np.array([row[5] for row in rows], np.int64),
        checked=checked,
        met=met,
        expected=expected,
        delivered=delivered,
        strategies=strategies,
        tokens=tokens,
        token_time=np.array(order, np.int64),
        token_reward=np.array([times[t][0] for t in order], np.int64),
        token_penalty=np.array([times[t][1] for t in order], np.int64),
    )


# -- Parity: LEM results, token transfers, SLA penalties (docs/parity.md) -------------------


@dataclass(frozen=True)
class Lems:
    """Solved LEMs (lem_results grouped by LEM slot) and the token transfers they caused."""

    start: Ints
    end: Ints
    players: Ints
    state: list[str]
    skipped: npt.NDArray[np.bool_]
    consumption: Ints  # Wh, Ec
    production: Ints  # Wh, Ep
    p_buy: Floats  # currency per kWh
    p_sell: Floats
    credited: Ints  # micro-currency, sum of the players' positive amounts
    debited: Ints  # ... of the negative ones (<= 0)
    transfers: int  # token_transfers of kind lem
    transferred: int  # micro-currency


def read_lems(conn: sa.Connection, present: set[str]) -> Lems | None:
    if not _has_rows(conn, present, "lem_results"):
        return None
    lr = _t("lem_results")
    slot = (lr.c.time_delivery_start, lr.c.time_delivery_end)
    query = sa.select(
        *slot,
        sa.func.count(),
        sa.func.max(lr.c.grid_state),
        _count_if(lr.c.skipped),
        _isum(lr.c.consumption),
        _isum(lr.c.production),
        sa.func.max(lr.c.p_buy),
        sa.func.max(lr.c.p_sell),
        _isum(sa.case((lr.c.amount > 0, lr.c.amount), else_=0)),
        _isum(sa.case((lr.c.amount < 0, lr.c.amount), else_=0)),
    ).group_by(*slot)
    rows = sorted(conn.execute(query).all())
    transfers = _transfers(conn, present, "lem")

    def col(i: int, dtype: Any) -> npt.NDArray[Any]:
        return np.array([row[i] for row in rows], dtype)

    return Lems(
        start=col(0, np.int64),
        end=col(1, np.int64),
        players=col(2, np.int64),
        state=[str(row[3]) for row in rows],
        skipped=col(4, np.int64) > 0,
        consumption=col(5, np.int64),
        production=col(6, np.int64),
        p_buy=col(7, np.float64),
        p_sell=col(8, np.float64),
        credited=col(9, np.int64),
        debited=col(10, np.int64),
        transfers=transfers[0],
        transferred=transfers[1],
    )


def _transfers(conn: sa.Connection, present: set[str], kind: str) -> tuple[int, int]:
    if "token_transfers" not in present:
        return 0, 0
    tt = _t("token_transfers")
    n, amount = conn.execute(sa.select(sa.func.count(), _isum(tt.c.amount)).where(tt.c.kind == kind)).one()
    return int(n), int(amount)


class SlaRow(msgspec.Struct, frozen=True):
    sla: str
    start: int | None
    end: int | None
    kpis: int
    solved: bool
    penalties: int
    amount: int  # micro-currency


class KpiPenalty(msgspec.Struct, frozen=True):
    sla: str
    kpi: str
    penalties: int
    amount: int


@dataclass(frozen=True)
class Slas:
    slas: list[SlaRow]  # by SLA id
    kpis: list[KpiPenalty]  # penalties per KPI, largest amount first
    payers: list[tuple[str, int, int]]  # (player, penalties, amount), the TOP_PAYERS largest
    penalties: int  # sla_penalty transfers
    amount: int


TOP_PAYERS = 10


def read_slas(conn: sa.Connection, present: set[str]) -> Slas | None:
    have_slas, have_results = _has_rows(conn, present, "slas"), _has_rows(conn, present, "sla_results")
    if not have_slas and not have_results:
        return None
    rows: dict[str, dict[str, Any]] = {}
    if have_slas:  # one row per SLA; its KPIs are a JSON list
        s = _t("slas")
        for sid, start, end, listed in conn.execute(sa.select(s.c.id, s.c.start, s.c.end, s.c.kpis)):
            rows[sid] = {"start": start, "end": end, "kpis": len(json.loads(listed or "[]"))}
    if have_results:
        r = _t("sla_results")
        for sid, penalties, amount in conn.execute(sa.select(r.c.id, r.c.penalties, r.c.amount)):
            rows.setdefault(sid, {}).update(solved=True, penalties=int(penalties), amount=int(amount))
    slas = [
        SlaRow(
            sid,
            v.get("start"),
            v.get("end"),
            int(v.get("kpis", 0)),
            bool(v.get("solved", False)),
            int(v.get("penalties", 0)),
            int(v.get("amount", 0)),
        )
        for sid, v in sorted(rows.items())
    ]
    kpis: list[KpiPenalty] = []
    payers: list[tuple[str, int, int]] = []
    if "token_transfers" in present:
        tt = _t("token_transfers")
        penalty = tt.c.kind == "sla_penalty"
        by_kpi = (
            sa.select(tt.c.reference, tt.c.kpi_id, sa.func.count(), _isum(tt.c.amount))
            .where(penalty)
            .group_by(tt.c.reference, tt.c.kpi_id)
        )
        kpis = [KpiPenalty(str(s), str(k or ""), int(n), int(a)) for s, k, n, a in conn.execute(by_kpi)]
        kpis.sort(key=lambda k: (-k.amount, k.sla, k.kpi))
        total = _isum(tt.c.amount)
        by_payer = (
            sa.select(tt.c.payer_id, sa.func.count(), total)
            .where(penalty)
            .group_by(tt.c.payer_id)
            .order_by(total.desc(), tt.c.payer_id)
            .limit(TOP_PAYERS)
        )
        payers = [(str(p), int(n), int(a)) for p, n, a in conn.execute(by_payer)]
    penalties, amount = _transfers(conn, present, "sla_penalty")
    return Slas(slas, kpis, payers, penalties, amount)


# -- the whole ledger -----------------------------------------------------------------------


def _any(conn: sa.Connection, table: str) -> bool:
    return conn.execute(sa.select(sa.literal(1)).select_from(_t(table)).limit(1)).first() is not None


def _has_rows(conn: sa.Connection, present: set[str], table: str) -> bool:
    """The table exists in this database and holds a row."""
    return table in present and _any(conn, table)


@dataclass(frozen=True)
class LedgerData:
    run: Run
    slots: Slots
    bills: Bills
    grid: Grid | None
    flex: Flex | None
    lems: Lems | None
    slas: Slas | None
    trades: int  # settlements

    @property
    def has_market(self) -> bool:
        """The ledger holds auction data: transactions, fills or readings."""
        return len(self.slots) > 0

    def summary(self) -> Summary:
        """controller.report's Summary of the run (wall-clock seconds are not in a ledger: 0)."""
        e = self.slots.energy
        grid_only = self.bills.grid_only if self.bills.grid_only is not None else np.zeros(len(self.bills), np.int64)
        bills = [
            Bill(p, int(m), int(g), int(b), int(s))
            for p, m, g, b, s in zip(
                self.bills.participant,
                self.bills.market,
                grid_only,
                self.bills.p2p_bought,
                self.bills.p2p_sold,
                strict=True,
            )
        ]
        return Summary(
            rounds=self.run.rounds,
            seconds=0.0,
            trades=self.trades,
            p2p_wh=int(self.slots.p2p.sum()),
            imported_wh=int(self.slots.imported.sum()),
            load_wh=int(self.slots.load.sum()),
            grid_bought_wh=int(e["grid_buy"].sum()),
            grid_sold_wh=int(e["grid_sell"].sum()),
            bills=bills,
        )


def present_tables(conn: sa.Connection) -> set[str]:
    """The record tables this database has (every microte ledger creates them all, empty)."""
    names = set(sa.inspect(conn).get_table_names()) & set(TABLE_MAP)
    if not names & set(REPORTED):
        raise NotALedger("not a microte ledger: none of its tables (transactions, settlements, meters, ...)")
    if not any(_any(conn, t) for t in REPORTED if t in names):
        raise NotALedger("an empty ledger: no transactions, fills, readings, rounds, grid or flexibility rows")
    return names


def read(conn: sa.Connection) -> LedgerData:
    present = present_tables(conn)
    run = read_run(conn, present)
    slots, meters = read_slots(conn, present, run)
    return LedgerData(
        run=run,
        slots=slots,
        bills=read_bills(conn, present, meters, run.tariff),
        grid=read_grid(conn, present, slots),
        flex=read_flex(conn, present),
        lems=read_lems(conn, present),
        slas=read_slas(conn, present),
        trades=int(slots.fills.sum()),
    )
