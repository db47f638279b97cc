"""A district of community markets in lockstep, in this process (docs/hierarchy.md).

A district scenario lists its communities (`[[communities]]`: an id and a community
scenario file); each community is a microte market of its own (`InprocMarket` with
`upstream=True`), and the district is one more, in which every community is a participant
(`CommunitySite`). Each round t, in this order:

1. every community opens round t: its members meter the current slot and trade; its gate
   closes slot g = t + (close_steps - 1) d and clears it locally;
2. every community passes g's residuals up: one district order per residual, while the
   district's gate for g is still open (the district is at round t - d);
3. every community processes its current slot (the district's fills of it came earlier);
4. the district opens round t: each community meters what its upstream account physically
   passed on in the slot it just processed, and the district's gate closes g and clears it
   among the communities; each fill goes back to the member whose residual it filled,
   as a settlement with the community's upstream account, before g is delivered;
5. the district processes its current slot.

Same scenario and seed, same ledgers (one per market), whatever else runs. The first slot
closed at the first round has no district trade: the district has no round open before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec

from controller.inproc import InprocMarket
from controller.scenario import Scenario, load_scenario, run_record
from ledger import open_sink
from ledger.markets import market_url, schema_of
from market.core.hierarchy import UPSTREAM_ID, Residual, UpstreamFill, physical_flows, residual_rows, upstream_orders
from market.core.records import Batch, Record
from participants.messages import StartRound
from participants.spec import decode_specs
from participants.traders import Order

# Lower case, digits and _: a market's PostgreSQL schema is `m_<id>`, one to one (ledger/markets.py).
MarketId = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]


class CommunityRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One `[[communities]]` table: the community's id (its participant id in the district
    and its market id) and its scenario (relative: to the district scenario's directory)."""

    id: MarketId
    scenario: str


class CommunitySite:
    """A community as a participant of the district: its orders are its residuals, its
    reading is what its upstream account passed on, its fills go back to its members."""

    def __init__(self, community: InprocMarket, pid: str) -> None:
        self.community = community
        self.pid = pid
        self._orders: dict[str, Residual] = {}  # district client id -> the residual it carries
        self._fills: dict[int, list[UpstreamFill]] = {}  # slot start -> fills seen this round
        self._flows: dict[int, tuple[dict[str, int], int]] = {}  # processed slot -> physical flows
        self._processed: set[int] = set()  # slots processed and not yet metered upstream
        self.refused = 0  # district orders refused (reported, never silent)

    # -- what the district asks of a participant ---------------------------------------------

    def on_round_msg(self, msg: StartRound, *, trade: bool = True) -> tuple[dict[str, Any] | None, list[Order]]:
        slot = msg.current_round
        if slot[0] not in self._processed:  # the community has not delivered this slot (never in lockstep)
            return None, []
        self._processed.discard(slot[0])
        gen, taken = self._flows.pop(slot[0], ({}, 0))
        meter = {"time_interval": list(slot), "generation": gen, "consumption": {"other": {"external": taken}}}
        return meter, []

    def on_settled(self, payload: Any) -> None:
        r = self._orders.get(payload.get("id") or "")
        if r is None:
            raise ValueError(f"{self.pid}: a district fill of an order it never placed: {payload}")
        start = int(payload["time_delivery"][0])
        price = float(payload["price"])
        fill = UpstreamFill(
            r, int(payload["quantity"]), price, price, str(payload["source"]), str(payload["commit_id"])
        )
        self._fills.setdefault(start, []).append(fill)

    def on_delivery(self, payload: Any) -> None:
        return None  # the community's bill upstream is on the district's ledger

    def take_records(self) -> list[Record]:
        return []

    # -- the community side ------------------------------------------------------------------

    def pass_up(self, district: InprocMarket, start: int) -> int:
        """Residuals of slot `start` as district orders (client ids `{community}:{start}-{n}`)."""
        d = self.community.config.duration
        found = self.community.market.residuals_of(start)
        orders = upstream_orders(self.pid, residual_rows(start, found), [start, start + d])
        for order, r in zip(orders, found, strict=True):
            self._orders[order["id"]] = r
        if not orders:
            return 0
        results = district.submit(self.pid, orders)
        self.refused += sum(1 for x in results if not x.get("ok"))
        return len(orders)

    def processed(self) -> None:
        """Note what the upstream account passed on in the slots the community just processed."""
        for result in self.community.results:
            gen, taken = physical_flows(result.transactions)
            self._processed.add(result.slot[0])
            if gen or taken:
                self._flows[result.slot[0]] = (gen, taken)

    def bring_down(self, now: int) -> int:
        """Settle the district's fills of this round in the community; its members learn of them."""
        n = 0
        for start in sorted(self._fills):
            fills = self._fills.pop(start)
            result = self.community.market.upstream_fills(start, fills, now)
            # Written with this round's records: the slot is delivered rounds later (or never,
            # if the run ends first), and a settlement must not wait for it.
            self.community.records += result.settlements
            for pid, payload in result.settled:
                self.community.site(pid).on_settled(payload)
            n += len(fills)
        self._orders = {k: r for k, r in self._orders.items() if int(k.partition(":")[2].split("-")[0]) > now}
        return n


class District(msgspec.Struct, frozen=True):
    scenario: Scenario
    communities: dict[str, Scenario]  # id -> its scenario, in the order listed
    base_dirs: dict[str, Path]
    files: dict[str, Path]  # id -> its scenario file


def load_district(path: str | Path, *, nested: bool = False) -> District:
    """The district scenario and its communities', checked for lockstep: the same start,
    step, number of rounds and `close_steps` (>= 2: a district fill must come before its
    slot is delivered), distinct ids, none of them the reserved upstream id."""
    path = Path(path)
    sc = load_scenario(path)
    if not sc.communities:
        raise ValueError(f"{path}: no [[communities]]")
    try:
        refs = msgspec.convert(sc.communities, list[CommunityRef])
    except msgspec.ValidationError as err:
        raise ValueError(f"{path}: communities: {err}") from None
    try:
        schema_of(sc.name)
    except ValueError as err:
        raise ValueError(f"{path}: the district's name is its market id: {err}") from None
    close = int(sc.market.get("close_steps", 2))
    if close < 2:
        raise ValueError(f"{path}: the district needs close_steps >= 2 (its fills must come before delivery)")
    own = {s.id for s in decode_specs(sc.participants)}
    out: dict[str, Scenario] = {}
    dirs: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for ref in refs:
        if ref.id in out or ref.id in own or ref.id == UPSTREAM_ID:
            raise ValueError(f"{path}: community id {ref.id!r} is taken (a community, a participant or reserved)")
        where = path.parent / ref.scenario
        c = load_scenario(where)
        for what, mine, theirs in (
            ("start", sc.start_time, c.start_time),
            ("step", sc.step, c.step),
            ("rounds", sc.rounds, c.rounds),
            ("close_steps", close, int(c.market.get("close_steps", 2))),
        ):
            if mine != theirs:
                raise ValueError(f"{where}: {what} {theirs} differs from the district's {mine} (lockstep)")
        if UPSTREAM_ID in {s.id for s in decode_specs(c.participants)}:
            raise ValueError(f"{where}: participant id {UPSTREAM_ID!r} is reserved for the district's account")
        if c.feeder is not None:
            raise ValueError(f"{where}: a community with a [feeder] is not run in a district yet")
        if c.communities and not nested:
            raise ValueError(f"{where}: a community with communities of its own runs in-process only (a city)")
        out[ref.id], dirs[ref.id], files[ref.id] = c, where.parent, where
    return District(sc, out, dirs, files)


class Node:
    """One market of the tree: its in-process market, the markets below it, and (below
    another) its participant in the market above."""

    def __init__(self, mid: str, path: Path, *, upstream: bool, seen: set[str]) -> None:
        d = load_district(path, nested=True) if load_scenario(path).communities else None
        self.id, self.path = mid, path
        self.children: dict[str, Node] = {}
        if d is not None:
            for cid, file in d.files.items():
                if cid in seen:
                    raise ValueError(f"{file}: market id {cid!r} is used twice in the tree")
                seen.add(cid)
                self.children[cid] = Node(cid, file, upstream=True, seen=seen)
        sc = load_scenario(path)
        sites = {cid: c.site for cid, c in self.children.items() if c.site is not None}
        self.market = InprocMarket(
            sc, decode_specs(sc.participants), base_dir=path.parent, upstream=upstream, sites=sites
        )
        self.site: CommunitySite | None = CommunitySite(self.market, mid) if upstream else None

    def markets(self) -> dict[str, InprocMarket]:
        out = {self.id: self.market}
        for c in self.children.values():
            out |= c.markets()
        return out


class DistrictRun:
    """The tree of markets (a district of communities, a city of districts, ...), stepped as
    the module docstring says, level by level from the bottom: nothing new per level."""

    def __init__(self, district: District, base_dir: Path, path: Path | None = None) -> None:
        self.district = district
        root = path or base_dir / f"{district.scenario.name}.toml"
        self.root = Node(district.scenario.name, root, upstream=False, seen={district.scenario.name})
        self.communities = {cid: c.market for cid, c in self.root.children.items()}
        self.sites = {cid: c.site for cid, c in self.root.children.items() if c.site is not None}
        self.upper = self.root.market
        self.passed_up = 0  # residual orders placed in the market above
        self.brought_down = 0  # fills from above settled below

    def step(self, t: int) -> None:
        self._visit(self.root, t, None)

    def _visit(self, node: Node, t: int, parent: Node | None) -> None:
        for child in node.children.values():
            self._visit(child, t, node)
        opened = node.market.open(t)  # meters what each child passed on in slot t, clears the gate
        for child in node.children.values():
            self._bring_down(child, t)
        if node.site is not None and parent is not None and parent.market.market.times is not None:
            self.passed_up += node.site.pass_up(parent.market, int(opened["last_settle"][0]))
        node.market.close()
        if node.site is not None:
            node.site.processed()

    def _bring_down(self, node: Node, t: int) -> None:
        assert node.site is not None
        self.brought_down += node.site.bring_down(t)
        for child in node.children.values():  # fills from above reach the members below, level by level
            self._bring_down(child, t)

    def take_records(self) -> dict[str, list[Record]]:
        return {mid: m.take_records() for mid, m in self.root.markets().items()}


def ledger_urls(ledger: str, ids: Sequence[str]) -> dict[str, str]:
    """One ledger per market: `{market}` in the URL (a file each), or one PostgreSQL database
    with a schema per market (ledger/markets.py)."""
    return {i: market_url(ledger, i) for i in ids}


async def run_district(
    path: str | Path, ledger: str, progress: Callable[[int], None] | None = None
) -> tuple[DistrictRun, dict[str, str], float]:
    """Every round of a district scenario, each market's ledger written (`ledger_urls`):
    (the run, the ledgers by market id, seconds the rounds took)."""
    district = load_district(path, nested=True)
    run = DistrictRun(district, Path(path).parent, Path(path))
    markets: Mapping[str, InprocMarket] = run.root.markets()
    urls = ledger_urls(ledger, list(markets))
    sinks = {i: open_sink(u) for i, u in urls.items()}
    for i, sink in sinks.items():
        await sink.start()
        m = markets[i]
        await sink.write(Batch((run_record(m.scenario, m.config),)))
    sc = district.scenario
    try:
        t0 = time.perf_counter()
        for k in range(sc.rounds):
            run.step(sc.start_time + k * sc.step)
            if progress is not None:
                progress(1)
            if k % 96 == 95 or k == sc.rounds - 1:
                await asyncio.gather(*(sinks[i].write(Batch(tuple(r))) for i, r in run.take_records().items() if r))
        seconds = time.perf_counter() - t0
    finally:
        for sink in sinks.values():
            await sink.close()
    return run, urls, seconds
