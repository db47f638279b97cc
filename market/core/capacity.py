"""Capacity-aware clearing (docs/grid.md): a radial feeder's sensitivities and branch limits as plain data, and
`limit_fills`, which cuts fills so no branch exceeds its limit. Pure; the feeder physics that
produces these limits is `market.feeder`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec

from market.core.clearing import Fill

# -- sensitivities and capacity-aware clearing (plain data) ----------------------------------


class Branch(msgspec.Struct, frozen=True):
    kind: Literal["line", "trafo", "switch"]
    index: int
    name: str
    limit_kw: float  # active power that loads it to 100 % at the rating voltage `v_pu` (inf: a closed switch)


class Sensitivities(msgspec.Struct, frozen=True):
    """A radial feeder's shift factors: `paths[bus]` lists the branches (indices into
    `branches`) between the bus and the slack, so 1 W injected at the bus moves 1 W towards
    the slack over each of them (lossless, DC-like; PTDF = 1 on the path, 0 elsewhere)."""

    branches: tuple[Branch, ...]
    paths: dict[int, tuple[int, ...]]
    slack: int
    v_pu: float = 1.0  # the voltage the limits assume (a lower one is conservative: more current per kW)

    def ptdf(self) -> list[list[float]]:
        """The PTDF matrix, rows = branches, columns = buses in sorted order."""
        buses = sorted(self.paths)
        rows = [[0.0] * len(buses) for _ in self.branches]
        for j, bus in enumerate(buses):
            for b in self.paths[bus]:
                rows[b][j] = 1.0
        return rows

    def flows(self, bus_injections_w: Mapping[int, float]) -> list[float]:
        """Estimated branch flows (W, towards the slack) of the given injections."""
        out = [0.0] * len(self.branches)
        for bus, p in bus_injections_w.items():
            for b in self.paths[bus]:
                out[b] += p
        return out

    def loading(self, flows_w: Sequence[float]) -> list[float]:
        """Estimated loading in % of each branch's rating (at `v_pu`)."""
        return [abs(f) / (br.limit_kw * 10.0) for f, br in zip(flows_w, self.branches, strict=True)]


class CapacityLimits(msgspec.Struct, frozen=True):
    """What capacity-aware clearing needs: each participant's bus, the sensitivities, and
    the share of each branch's rating trades may use (1.0: up to 100 %). A participant not
    on the feeder counts as at the slack (its trades load only the branches of the other)."""

    bus_of: dict[str, int]
    sensitivities: Sensitivities
    max_loading: Annotated[float, msgspec.Meta(gt=0, le=10)] = 1.0


class Cut(msgspec.Struct, frozen=True):
    """One fill `limit_fills` curtailed: its index among the fills given, the quantity kept
    (0: dropped), and the binding branch (index into the sensitivities' branches) with its
    flow before the fill and its limit, in W."""

    index: int
    kept: int
    branch: int
    flow_w: float
    limit_w: float


def limit_fills(
    fills: Sequence[Fill],
    limits: CapacityLimits,
    duration: int,
    base_w: Sequence[float] | None = None,
) -> list[Fill]:
    """The fills (in commit order) cut so that no branch flow exceeds its limit: each fill
    moves its power (quantity over the slot) from the seller's bus to the buyer's; a fill
    that would push a branch past its limit is curtailed to what still fits (dropped if
    nothing fits). `base_w`: flows before trading (e.g. the DSO's forecast), else zero.

    Greedy in commit order (best prices first), so the cheapest energy keeps the capacity;
    O(fills x path length)."""
    return curtail(fills, limits, duration, base_w)[0]


def curtail(
    fills: Sequence[Fill],
    limits: CapacityLimits,
    duration: int,
    base_w: Sequence[float] | None = None,
) -> tuple[list[Fill], list[Cut]]:
    """`limit_fills`, and a `Cut` for every fill it curtailed or dropped."""
    sens = limits.sensitivities
    flow = list(base_w) if base_w is not None else [0.0] * len(sens.branches)
    cap = [br.limit_kw * 1000.0 * limits.max_loading for br in sens.branches]
    paths = sens.paths
    out: list[Fill] = []
    cuts: list[Cut] = []
    w_per_wh = 3600.0 / duration
    pairs: dict[tuple[int | None, int | None], list[tuple[int, float]]] = {}  # (seller bus, buyer bus) -> shifts
    for i, f in enumerate(fills):
        seller = limits.bus_of.get(f.ask.participant)
        buyer = limits.bus_of.get(f.bid.participant)
        coef = pairs.get((seller, buyer))
        if coef is None:
            up = set(paths[seller]) if seller is not None else set()
            down = set(paths[buyer]) if buyer is not None else set()
            coef = pairs[seller, buyer] = [(b, 1.0) for b in sorted(up - down)] + [(b, -1.0) for b in sorted(down - up)]
        p_max, binding = math.inf, -1
        for b, c in coef:
            room = max(0.0, cap[b] - c * flow[b])
            if room < p_max:
                p_max, binding = room, b
        q = f.quantity if p_max == math.inf else min(f.quantity, math.floor(p_max / w_per_wh + 1e-9))
        if q < f.quantity:
            cuts.append(Cut(i, max(q, 0), binding, coef_flow(flow, coef, binding), cap[binding]))
        if q <= 0:
            continue
        p = q * w_per_wh
        for b, c in coef:
            flow[b] += c * p
        out.append(f if q == f.quantity else msgspec.structs.replace(f, quantity=q))
    return out, cuts


def coef_flow(flow: Sequence[float], coef: Sequence[tuple[int, float]], branch: int) -> float:
    """A branch's flow as the fill sees it: in the direction the fill would load it."""
    sign = next(c for b, c in coef if b == branch)
    return sign * flow[branch]


# -- pandapower networks -------------------------------------------------------------------
