"""Ledger records produced by the core (PROTOCOL.md section Ledger).

Records are plain frozen structs; the server hands them to a sink, and the sink stores
each as one row of the table named by its `TABLE`. Energy is integer Wh, money integer
micro-currency (`amount = round(quantity * price * 1000)` for a price per kWh).
Ids are deterministic (derived from the slot and an index within it), so re-processing a
slot after a crash yields the same ids and a retried write is a no-op.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

TransactionKind = Literal["p2p", "bess_compensation", "financial", "self", "grid_sell", "grid_buy"]
GRID_ID = "grid"


def amount(quantity: int, price: float) -> int:
    """Integer micro-currency for `quantity` Wh at `price` per kWh."""
    return round(quantity * price * 1000)


class Record(msgspec.Struct, frozen=True, gc=False):
    """A ledger row. `gc=False` (inherited): every field is a number or a string, so a
    record is in no reference cycle, and the hundreds of thousands a long run holds cost
    the garbage collector nothing (it ran a third of a 1,000-participant round)."""

    TABLE: ClassVar[str]

    def row(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


class Transaction(Record, frozen=True):
    TABLE: ClassVar[str] = "transactions"
    id: str
    kind: TransactionKind
    time_delivery_start: int
    time_delivery_end: int
    seller_id: str
    buyer_id: str
    energy_source: str
    quantity: int
    price_buy: float
    price_sell: float
    amount_buy: int
    amount_sell: int
    commit_id: str | None
    time_creation: int


class Settlement(Record, frozen=True):
    """One fill of the clearing: `quantity` Wh from seller to buyer for a delivery slot."""

    TABLE: ClassVar[str] = "settlements"
    commit_id: str
    time_delivery_start: int
    time_delivery_end: int
    seller_id: str
    buyer_id: str
    bid_uuid: str
    ask_uuid: str
    bid_id: str | None
    ask_id: str | None
    energy_source: str
    quantity: int
    price_buy: float
    price_sell: float
    amount_buy: int
    amount_sell: int
    dispatch: bool
    seq: int  # commit order within the slot
    time_creation: int


class MeterRecord(Record, frozen=True):
    """One meter reading; the source maps are stored as canonical JSON text."""

    TABLE: ClassVar[str] = "meters"
    id: str
    participant_id: str
    time_interval_start: int
    time_interval_end: int
    generation: str
    consumption: str
    time_creation: int


class RoundRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "rounds"
    id: str
    time: int
    duration: int
    current_round_start: int
    matched_slot_start: int
    trades: int
    metered: int
    missing: str  # JSON list of participant ids
    records: int


class RunRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "runs"
    id: str
    scenario: str
    seed: int
    started: int
    config: str  # canonical JSON of the market settings


class EntryRecord(Record, frozen=True):
    """An accepted bid or ask, durable before it is acknowledged (so a restart keeps the book)."""

    TABLE: ClassVar[str] = "entries"
    id: str  # the entry's uuid
    client_id: str | None
    participant_id: str
    side: str
    quantity: int
    price: float
    time_delivery_start: int
    time_delivery_end: int
    source: str | None
    time_submission: int
    seq: int  # the participant's n-th accepted entry


class CancelRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "cancels"
    id: str  # the cancelled entry's uuid
    participant_id: str
    time_delivery_start: int
    time_creation: int


TABLES: tuple[type[Record], ...] = (
    Transaction,
    Settlement,
    MeterRecord,
    RoundRecord,
    RunRecord,
    EntryRecord,
    CancelRecord,
)


class Batch(msgspec.Struct, frozen=True):
    """Records to be made durable together (one round, or one slot's processing)."""

    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)


class BalanceTransaction(Record, frozen=True):
    """One transaction of a sealed balance (PROTOCOL.md namespace /balancing): `energy` Wh
    from `from_id` to `to_id`; `seq` is its place in the balance, `seal` the balance's seal."""

    TABLE: ClassVar[str] = "balance_transactions"
    id: str  # f"b{epoch}-{asset_id}-{seq}"
    asset_id: str
    epoch: int
    epoch_start: int
    epoch_end: int
    seq: int
    from_id: str
    to_id: str
    energy: int
    seal: str


class BalanceSeal(Record, frozen=True):
    """A sealed balance: one row even when it has no transactions."""

    TABLE: ClassVar[str] = "balance_seals"
    id: str  # f"s{epoch}-{asset_id}"
    asset_id: str
    epoch: int
    epoch_start: int
    epoch_end: int
    transactions: int
    energy: int  # Wh, sum over its transactions
    seal: str


TABLES = (*TABLES, BalanceTransaction, BalanceSeal)


# -- Parity market (PROTOCOL.md namespace /grid, seed 000; docs/parity.md) -------------------
# Participant ids here are registry ids: the pseudonyms of the seed (the ledger never holds
# real names; only the operator's registry maps an id to a person or a meter).

ParityGridState = Literal["GREEN", "YELLOW", "RED"]


class GridStateRecord(Record, frozen=True):
    """The DSO's grid state of one LEM slot; a revision before the slot starts is the next row."""

    TABLE: ClassVar[str] = "grid_states"
    id: str  # f"g{start}.{revision}"
    time_delivery_start: int
    time_delivery_end: int
    state: ParityGridState
    revision: int  # 0 for the first state set for the slot
    dso_id: str
    time_creation: int


class LemDefaultsRecord(Record, frozen=True):
    """Default LEM parameters of one grid state, set by the market operator (cents per kWh;
    `beta` in currency per kWh^2). A later revision replaces the earlier one."""

    TABLE: ClassVar[str] = "lem_defaults"
    id: str  # f"d.{grid_state}.{revision}"
    grid_state: ParityGridState
    revision: int
    pb_bau: float
    ps_bau: float
    pb_p2p: float
    ps_p2p: float
    beta: float
    operator_id: str
    time_creation: int


class LemRecord(Record, frozen=True):
    """A LEM set by an aggregator: its slot, players and (optionally) its own parameters."""

    TABLE: ClassVar[str] = "lems"
    id: str  # f"lem{start}"
    time_delivery_start: int
    time_delivery_end: int
    aggregator_id: str
    players: str  # JSON list of participant ids, in the order given
    params: str | None  # JSON {"pbBAU", "psBAU", "pbP2P", "psP2P", "beta"}, or None: defaults
    time_creation: int


class LemMeasureRecord(Record, frozen=True):
    """A prosumer's consumption and production (Wh) in a LEM slot, saved after it ended."""

    TABLE: ClassVar[str] = "lem_measures"
    id: str  # f"lm{start}/{participant}"
    time_delivery_start: int
    time_delivery_end: int
    participant_id: str
    consumption: int
    production: int
    time_creation: int


class LemResultRecord(Record, frozen=True):
    """One player's outcome of a solved LEM (every player gets a row; RED: skipped, amount 0)."""

    TABLE: ClassVar[str] = "lem_results"
    id: str  # f"lr{start}/{participant}"
    solve_id: str
    time_delivery_start: int
    time_delivery_end: int
    participant_id: str
    aggregator_id: str
    grid_state: ParityGridState
    skipped: bool  # RED: not solved as P2P, no tokens move
    consumption: int  # Wh
    production: int  # Wh
    measured: Literal["prosumer", "meter", "none"]  # where the energies came from
    total_consumption: int  # Ec, Wh
    total_production: int  # Ep, Wh
    p_buy: float  # currency per kWh
    p_sell: float
    beta: float
    amount: int  # micro-currency this player's balance moved by: its LEM price less `auction`
    time_creation: int
    auction: int = 0  # micro-currency the auction's transactions moved for it in the slot (netted)


class TokenTransfer(Record, frozen=True):
    """Tokens (integer micro-currency) moving from `payer_id` to `payee_id`."""

    TABLE: ClassVar[str] = "token_transfers"
    id: str  # "t/{solve}/{payer}/{payee}" (LEMs) or "p/{sla}/{kpi}/{player}/{start}" (penalties)
    kind: Literal["lem", "sla_penalty"]
    payer_id: str
    payee_id: str
    amount: int  # > 0
    reference: str  # the solve id (LEMs) or the SLA id (penalties)
    kpi_id: str | None
    time_start: int  # the solved LEMs' span, or the KPI interval of a penalty
    time_end: int
    time_creation: int


class SlaRecord(Record, frozen=True):
    """An SLA set by an aggregator: its period and KPIs."""

    TABLE: ClassVar[str] = "slas"
    id: str  # the SLA id
    aggregator_id: str
    start: int
    end: int
    kpis: str  # JSON list of {"id", "signal", "rule", "limit", "penalty", "players", "resolution"}
    time_creation: int


class KpiValueRecord(Record, frozen=True):
    """A KPI value saved by a player of the KPI (prosumer or oracle) for one resolution period."""

    TABLE: ClassVar[str] = "kpi_values"
    id: str  # f"kv/{sla}/{kpi}/{participant}/{start}"
    sla_id: str
    kpi_id: str
    participant_id: str
    time_interval_start: int
    time_interval_end: int
    value: float
    time_creation: int


class SlaResultRecord(Record, frozen=True):
    """An SLA checked after its end: its penalties are the `sla_penalty` transfers."""

    TABLE: ClassVar[str] = "sla_results"
    id: str  # the SLA id
    penalties: int
    amount: int  # micro-currency, sum of the penalties
    solved_by: str
    time_creation: int


TABLES = (
    *TABLES,
    GridStateRecord,
    LemDefaultsRecord,
    LemRecord,
    LemMeasureRecord,
    LemResultRecord,
    TokenTransfer,
    SlaRecord,
    KpiValueRecord,
    SlaResultRecord,
)


# -- flexibility (seed 001, docs/flexibility.md) ----------------------------------------------


class FlexContractRecord(Record, frozen=True):
    """One event of a prosumer <-> aggregator flexibility contract, with the terms after it.
    Powers in W, durations in seconds, prices per kWh."""

    TABLE: ClassVar[str] = "flex_contracts"
    id: str  # f"{contract_id}.{version}"
    contract_id: str
    version: int
    event: str  # registered | renegotiated | cancelled | expired
    prosumer_id: str
    aggregator_id: str
    source: str
    production: int  # W expected (the baseline's production)
    consumption: int  # W expected (the baseline's consumption)
    flex_up: int  # W guaranteed: more production or less consumption
    flex_down: int  # W guaranteed: less production or more consumption
    duration: int  # s, longest activation
    notice: int  # s, longest delay between notice and delivery
    price_up: float
    price_down: float
    expires: int
    downward: bool  # a renegotiation that lowered what is guaranteed
    time: int


class FlexRequestRecord(Record, frozen=True):
    """A grid operator's request to an aggregator, once allocated."""

    TABLE: ClassVar[str] = "flex_requests"
    id: str  # f"fr{n}"
    dso_id: str
    aggregator_id: str
    client_id: str | None
    power: int  # W, > 0 up, < 0 down
    time_delivery_start: int
    time_delivery_end: int
    strategy: str
    offered: int
    accepted: int
    allocated: int  # W, sum of the allocations (absolute)
    shortfall: int  # W not allocated
    reason: str | None
    time: int


class FlexAnswerRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "flex_answers"
    id: str  # f"{request_id}.{prosumer_id}"
    request_id: str
    prosumer_id: str
    answer: str  # accept | decline | silent
    time: int


class FlexAllocationRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "flex_allocations"
    id: str  # f"{request_id}.{prosumer_id}"
    request_id: str
    prosumer_id: str
    contract_id: str
    status: str  # allocated | displaced
    power: int  # W, signed as the request
    expected: int  # Wh of flexibility over the window
    baseline: int  # Wh net (production - consumption) the contract expects over the window
    price: float  # per kWh, the contract's price in the request's direction
    reputation: int  # at allocation
    time: int


class FlexDeliveryRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "flex_deliveries"
    id: str  # f"{request_id}.{prosumer_id}"
    request_id: str
    prosumer_id: str
    metered: bool
    production: int  # Wh metered over the window (0 if not metered)
    consumption: int
    baseline: int  # Wh
    expected: int  # Wh
    delivered: int  # Wh, signed: flexibility in the request's direction against the baseline
    met: bool
    reward: int  # micro-currency
    penalty: int  # micro-currency
    time: int


class FlexTokenRecord(Record, frozen=True):
    """Tokens moved by a delivery check: rewards aggregator -> prosumer, penalties back."""

    TABLE: ClassVar[str] = "flex_tokens"
    id: str  # f"{request_id}.{prosumer_id}.{reason}"
    request_id: str
    from_id: str
    to_id: str
    amount: int  # micro-currency, > 0
    reason: str  # reward | penalty
    time: int


class FlexReputationRecord(Record, frozen=True):
    TABLE: ClassVar[str] = "flex_reputation"
    id: str  # f"{participant_id}.{n}", n counting that participant's updates from 1
    participant_id: str
    reason: str  # compliance | participation | renegotiation | penalty
    delta: int
    score: int  # after the update
    ref: str  # the request or contract id
    time: int


TABLES = (
    *TABLES,
    FlexContractRecord,
    FlexRequestRecord,
    FlexAnswerRecord,
    FlexAllocationRecord,
    FlexDeliveryRecord,
    FlexTokenRecord,
    FlexReputationRecord,
)


# -- Grid physics (seed 004; docs/grid.md) ---------------------------------------------------


class GridFlowRecord(Record, frozen=True):
    """A DSO power flow of one slot on the feeder: `kind` "forecast" (before the gate, from
    forecast injections; `state` is what the thresholds say and what the DSO set) or
    "metered" (after delivery, from the meter readings). Extremes are None when the power
    flow did not converge (then `state` is RED)."""

    TABLE: ClassVar[str] = "grid_flows"
    id: str  # f"pf{start}.{kind}"
    kind: str  # forecast | metered
    time_delivery_start: int
    time_delivery_end: int
    state: str  # GREEN | YELLOW | RED
    converged: bool
    vm_min_pu: float | None
    vm_max_pu: float | None
    line_loading_max: float | None  # percent of the line's rating
    trafo_loading_max: float | None  # percent of the transformer's rating
    losses_kw: float | None
    injection_kw: float  # the participants' net injection into the feeder (export positive)
    participants: int  # participants counted (metered: those with a reading)
    time: int  # market time of the assessment
    # The injections the power flow ran on, W per bus index (JSON object), so that it can be
    # run again from the ledger alone with the scenario's [feeder] (the network's own loads
    # are in the network).
    buses: str = "{}"


class CurtailmentRecord(Record, frozen=True):
    """A fill of the clearing that capacity-aware clearing cut (docs/grid.md): what the
    clearing matched, what the feeder's branch limits kept, and the branch that bound it."""

    TABLE: ClassVar[str] = "curtailments"
    id: str  # f"k{start}-{i}": the i-th fill of the slot's clearing, in commit order
    time_delivery_start: int
    time_delivery_end: int
    seller_id: str
    buyer_id: str
    bid_uuid: str
    ask_uuid: str
    cleared: int  # Wh the clearing matched
    kept: int  # Wh left after the cut (0: dropped)
    commit_id: str | None  # the settlement of what was kept (None: dropped)
    branch: str  # the binding branch's name
    flow_w: float  # its flow before this fill (the base flow plus the fills before), towards the slack
    limit_w: float  # its limit: rating x max_loading
    time_creation: int


class BaseFlowRecord(Record, frozen=True):
    """The branch flows before trading that capacity-aware clearing used at a slot's gate
    (the DSO's `grid_flows.set`; a slot without one used zero flows and has no row)."""

    TABLE: ClassVar[str] = "base_flows"
    id: str  # f"b{start}"
    time_delivery_start: int
    time_delivery_end: int
    flows_w: str  # JSON list, W per branch in the feeder's order, towards the slack
    time_creation: int


TABLES = (*TABLES, GridFlowRecord, CurtailmentRecord, BaseFlowRecord)


# -- balancing journal (seed 002; docs/balancing.md, section Ledger) ---------------------------


class BalanceEventRecord(Record, frozen=True):
    """One accepted `/balancing` event that changed its state, in the order accepted: what a
    restarted server replays to rebuild assets, contracts, settlements and seals."""

    TABLE: ClassVar[str] = "balance_events"
    id: str  # f"e{seq}"
    seq: int  # 1, 2, ... in the order the events were accepted
    event: str  # the event name: asset.upsert, contract.add, ..., balancing.addSettlement, balancing.seal
    payload: str  # the accepted message as JSON (wire field names)


TABLES = (*TABLES, BalanceEventRecord)


# -- packetized energy management (seed 004; docs/pem.md, section Ledger) -----------------------


class HouseSlotRecord(Record, frozen=True):
    """One thermal house of a PEM site over one slot: its air temperature against its comfort
    band, its HVAC energy (the coordinator's meter reading is the sum over its houses) and
    its packets. Temperatures in C at the device steps' starts (rounded to 1e-4)."""

    TABLE: ClassVar[str] = "house_slots"
    id: str  # f"h{start}.{site}.{house}"
    site: str  # the coordinator's participant id
    house: int  # the house's number in the site (its key: 0, 1, ...)
    time_delivery_start: int
    time_delivery_end: int
    air_start: float
    air_min: float
    air_max: float
    air_end: float  # after the slot's last step
    band_low: float  # comfort band [band_low, band_high]
    band_high: float
    hvac_wh: int
    requested: int  # packets asked for (0 under plain thermostats)
    accepted: int
    opted_out_steps: int  # steps spent outside the band, out of the packet scheme
    kh_above: float  # K.h above the band over the slot (from the steps' temperatures)
    kh_below: float  # K.h below it


class PemSlotRecord(Record, frozen=True):
    """A PEM site's feeder figures of one slot: the coordinator's target (the feeder capacity
    left after the other participants' forecast import; None: no limit), the load it
    metered, its peak, and its packets. `steps_over` counts device steps whose HVAC load
    exceeded the target (0 under PEM unless opted-out devices alone exceed it)."""

    TABLE: ClassVar[str] = "pem_slots"
    id: str  # f"pem{start}.{site}"
    site: str
    mode: str  # pem | thermostat
    time_delivery_start: int
    time_delivery_end: int
    capacity_w: int | None  # the site's `capacity_kw` (None: no limit)
    target_w: int | None
    load_wh: int
    peak_w: int
    steps_over: int
    requested: int
    accepted: int
    denied: int
    opted_out: int  # device steps outside the band
    outdoor_c: float  # mean outdoor temperature over the slot
    houses: int


TABLES = (*TABLES, HouseSlotRecord, PemSlotRecord)
