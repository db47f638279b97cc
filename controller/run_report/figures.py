"""The run report's figures, as PNG bytes: matplotlib's object API on the Agg canvas (no
pyplot state, no display). Per-slot series are drawn as stairs over the slot edges, one
path each, so a year of 15-minute slots draws as fast as a day."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib.dates as mdates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from controller import grid_view
from controller.run_report.queries import Bills, Flex, Grid, Lems, Slas, Slots

DPI = 100
WIDTH = 11.0
BARS_UP_TO = 40  # participants drawn as bars; more: a scatter of bill against grid-only
MARKERS_UP_TO = 400  # slots whose clearing prices get a marker each
MIX_COLOURS = {
    "self": "#59a14f",
    "p2p": "#f28e2b",
    "bess_compensation": "#9c755f",
    "grid_buy": "#4e79a7",
    "grid_sell": "#76b7b2",
}
MIX_LABELS = {
    "self": "self-consumption",
    "p2p": "P2P",
    "bess_compensation": "battery compensation",
    "grid_buy": "grid buy",
    "grid_sell": "grid sell (export)",
}


def _figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    return fig, [ax for (ax,) in axes]


def _legend(ax: Axes, ncols: int, handles: tuple[list[Any], list[Any]] | None = None) -> None:
    """The legend above the plot, outside it: it never hides data."""
    where: dict[str, Any] = {"loc": "lower left", "bbox_to_anchor": (0, 1.01), "borderaxespad": 0, "frameon": False}
    if handles is not None:
        ax.legend(*handles, fontsize=8, ncols=ncols, **where)
    else:
        ax.legend(fontsize=8, ncols=ncols, **where)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _dates(seconds: Any) -> Any:
    """Unix seconds -> matplotlib date numbers."""
    return mdates.date2num(np.asarray(seconds, dtype=np.int64).astype("datetime64[s]"))  # type: ignore[no-untyped-call]


def _edges(slots: Slots) -> Any:
    return _dates(np.append(slots.start, slots.start[-1] + slots.duration)) if len(slots) else np.zeros(1)


def _mids(slots: Slots) -> Any:
    return _dates(slots.start + slots.duration // 2)


def _time_axis(ax: Axes, tz: ZoneInfo, label: str) -> None:
    locator = mdates.AutoDateLocator(tz=tz)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))  # type: ignore[no-untyped-call]
    ax.set_xlabel(label)


def _shade_states(ax: Axes, slots: Slots, states: Sequence[str] | None) -> None:
    """Slots the DSO marked YELLOW or RED, shaded (contiguous runs as one span)."""
    if not states:
        return
    edges = _edges(slots)
    i, n = 0, len(states)
    while i < n:
        j = i
        while j + 1 < n and states[j + 1] == states[i]:
            j += 1
        if states[i] != "GREEN":
            colour = grid_view.STATE_COLOURS.get(states[i], "white")
            ax.axvspan(edges[i], edges[j + 1], color=colour, lw=0, zorder=0)
        i = j + 1


def prices(slots: Slots, tz: ZoneInfo, states: Sequence[str] | None = None) -> bytes:
    """The clearing price per slot (volume-weighted over its fills, and the range of its
    fills' prices) against the grid's buy and sell prices."""
    fig, (ax,) = _figure(1, 4.2)
    edges, mids = _edges(slots), _mids(slots)
    _shade_states(ax, slots, states)
    ax.stairs(slots.grid_buy, edges, baseline=None, color="0.25", lw=1.3, label="grid buy price")
    ax.stairs(slots.grid_sell, edges, baseline=None, color="0.6", lw=1.3, label="grid sell price")
    marker = "o" if len(slots) <= MARKERS_UP_TO else None
    spread = np.nan_to_num(slots.price_high - slots.price_low) > 1e-12
    if spread.any():
        ax.fill_between(mids, slots.price_low, slots.price_high, color="tab:orange", alpha=0.2, lw=0, label="range")
    ax.plot(mids, slots.price_buy, marker=marker, ms=2.5, lw=1.1, color="tab:orange", label="clearing (buyers)")
    if not np.allclose(slots.price_buy, slots.price_sell, equal_nan=True):
        ax.plot(mids, slots.price_sell, marker=marker, ms=2.5, lw=1.1, color="tab:brown", label="clearing (sellers)")
    ax.set_ylabel("price (per kWh)")
    ax.set_ylim(bottom=0)
    _legend(ax, 5)
    shading = "; shading: YELLOW/RED grid states" if states else ""
    _time_axis(ax, tz, f"delivery slot ({tz.key}){shading}")
    fig.suptitle("Clearing price per slot against the grid's prices")
    return _png(fig)


def p2p(slots: Slots, tz: ZoneInfo) -> bytes:
    """Energy settled between neighbours per slot (fills), what was delivered of it, and the
    number of fills."""
    fig, (ax,) = _figure(1, 4.2)
    edges = _edges(slots)
    ax.stairs(slots.settled / 1000, edges, fill=True, color="tab:orange", alpha=0.55, label="settled (fills)")
    ax.stairs(
        slots.p2p / 1000,
        edges,
        baseline=None,
        color="tab:red",
        lw=1.1,
        label="delivered P2P (incl. battery compensation)",
    )
    ax.set_ylabel("P2P energy (kWh per slot)")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.stairs(slots.fills, edges, baseline=None, color="0.3", lw=0.9, ls=":", label="fills")
    twin.set_ylabel("fills per slot")
    twin.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    _legend(ax, 3, (lines[0] + more[0], lines[1] + more[1]))
    _time_axis(ax, tz, f"delivery slot ({tz.key})")
    fig.suptitle("P2P volume and fills per slot")
    return _png(fig)


def energy_mix(slots: Slots, tz: ZoneInfo) -> bytes:
    """Where the community's consumption came from per slot (stacked above zero: its own
    generation used at home or charged into its batteries, P2P, battery compensation, the
    grid) and what it exported to the grid (below zero), from the energy transactions."""
    fig, (ax,) = _figure(1, 4.6)
    edges = _edges(slots)
    household = slots.energy["self"] - slots.charged  # self rows of consumption.other
    layers = [
        (household, MIX_COLOURS["self"], "self-consumption", None),
        (slots.charged, MIX_COLOURS["self"], "battery charged from own generation", "////"),
        *[(slots.energy[k], MIX_COLOURS[k], MIX_LABELS[k], None) for k in ("p2p", "bess_compensation", "grid_buy")],
    ]
    base = np.zeros(len(slots))
    for wh, colour, label, hatch in layers:
        top = base + wh / 1000
        ax.stairs(
            top, edges, baseline=base, fill=True, color=colour, hatch=hatch, label=label, alpha=0.6 if hatch else 1
        )
        base = top
    sell = -slots.energy["grid_sell"] / 1000
    ax.stairs(sell, edges, baseline=0, fill=True, color=MIX_COLOURS["grid_sell"], label=MIX_LABELS["grid_sell"])
    total = (slots.load + slots.charged) / 1000
    ax.stairs(total, edges, baseline=None, color="black", lw=0.8, label="metered consumption (meters)")
    ax.axhline(0, color="0.2", lw=0.6)
    ax.set_ylabel("kWh per slot (export below 0)")
    _legend(ax, 4)
    _time_axis(ax, tz, f"delivery slot ({tz.key})")
    fig.suptitle("Energy mix per slot")
    return _png(fig)


def bills(b: Bills) -> bytes:
    """Each participant's market bill next to what the same metered energy would have cost
    at the grid tariff alone (positive: paid; negative: earned)."""
    money = b.market / 1e6
    if len(b) <= BARS_UP_TO:
        fig, (ax,) = _figure(1, 4.4)
        x = np.arange(len(b))
        w = 0.4
        if b.grid_only is not None:
            ax.bar(x - w / 2, b.grid_only / 1e6, w, color="0.65", label="grid only")
            ax.bar(x + w / 2, money, w, color="tab:blue", label="market bill")
        else:
            ax.bar(x, money, 2 * w, color="tab:blue", label="market bill")
        ax.set_xticks(x, b.participant, rotation=90 if len(b) > 20 else 0, fontsize=8)
        ax.axhline(0, color="0.2", lw=0.6)
        ax.set_ylabel("currency (paid > 0, earned < 0)")
        ax.set_xlabel("participant")
        _legend(ax, 3)
    else:
        fig, (ax,) = _figure(1, 6.0)
        if b.grid_only is not None:
            grid = b.grid_only / 1e6
            ax.scatter(grid, money, s=8, alpha=0.5, color="tab:blue", lw=0, label="participant")
            lo, hi = float(min(grid.min(), money.min())), float(max(grid.max(), money.max()))
            ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", label="bill = grid only (below: saving)")
            ax.set_xlabel("grid-only bill (currency)")
        else:
            ax.scatter(np.arange(len(b)), np.sort(money), s=6, color="tab:blue", lw=0, label="participant")
            ax.set_xlabel("participants, by bill")
        ax.set_ylabel("market bill (currency; paid > 0, earned < 0)")
        _legend(ax, 3)
    fig.suptitle("Bills against grid-only per participant")
    return _png(fig)


def sufficiency(slots: Slots, tz: ZoneInfo) -> bytes:
    """Self-sufficiency (consumption not bought from the grid) and P2P share (imports from
    neighbours), cumulative over the run (their end values are the headline KPIs) and per slot."""
    fig, (ax,) = _figure(1, 4.2)
    edges, mids = _edges(slots), _mids(slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_ss = np.where(slots.load > 0, 1 - slots.energy["grid_buy"] / slots.load, np.nan)
        per_p2p = np.where(slots.imported > 0, slots.p2p / slots.imported, np.nan)
        load, imported = np.cumsum(slots.load), np.cumsum(slots.imported)
        cum_ss = np.where(load > 0, 1 - np.cumsum(slots.energy["grid_buy"]) / load, np.nan)
        cum_p2p = np.where(imported > 0, np.cumsum(slots.p2p) / imported, np.nan)
    ax.stairs(
        100 * per_ss, edges, baseline=None, color="tab:green", lw=0.7, alpha=0.45, label="self-sufficiency, per slot"
    )
    ax.stairs(100 * per_p2p, edges, baseline=None, color="tab:orange", lw=0.7, alpha=0.45, label="P2P share, per slot")
    ax.plot(mids, 100 * cum_ss, color="tab:green", lw=2, label="self-sufficiency, cumulative")
    ax.plot(mids, 100 * cum_p2p, color="tab:orange", lw=2, label="P2P share, cumulative")
    ax.set_ylim(-2, 102)
    ax.set_ylabel("%")
    _legend(ax, 2)
    _time_axis(ax, tz, f"delivery slot ({tz.key})")
    fig.suptitle("Self-sufficiency and P2P share over the run")
    return _png(fig)


def grid(g: Grid, tz: ZoneInfo) -> bytes:
    """controller.grid_view's figure: voltage, loading, P2P volume and prices per slot,
    shaded by the DSO's grid state."""
    buf = io.BytesIO()
    grid_view.plot(g.rows, buf, timezone=tz.key)
    return buf.getvalue()


def flex(f: Flex, tz: ZoneInfo) -> bytes:
    """Flexibility requests per delivery window (requested, allocated), their delivery
    checks (expected, delivered) and the tokens moved (cumulative rewards and penalties)."""
    fig, (req, dlv, tok) = _figure(3, 8.5)
    mids = _dates((f.start + f.end) // 2)
    width = np.maximum((f.end - f.start) / 86400 * 0.9, 1e-4)
    req.bar(mids, f.requested / 1000, width, color="0.7", label="requested |power|")
    req.bar(mids, f.allocated / 1000, width * 0.5, color="tab:purple", label="allocated")
    req.set_ylabel("kW")
    _legend(req, 2)
    fig.suptitle("Flexibility requests, delivery checks and token moves")
    dlv.bar(mids, f.expected / 1000, width, color="0.7", label="expected")
    dlv.bar(mids, f.delivered / 1000, width * 0.5, color="tab:green", label="delivered")
    dlv.axhline(0, color="0.2", lw=0.6)
    dlv.set_ylabel("kWh of flexibility")
    _legend(dlv, 2)
    if len(f.token_time):
        t = _dates(f.token_time)
        tok.step(t, np.cumsum(f.token_reward) / 1e6, where="post", marker="o", ms=3, color="tab:green", label="rewards")
        tok.step(
            t, np.cumsum(f.token_penalty) / 1e6, where="post", marker="o", ms=3, color="tab:red", label="penalties"
        )
        _legend(tok, 2)
    else:
        tok.text(0.5, 0.5, "no tokens moved", transform=tok.transAxes, ha="center", va="center", color="0.4")
    tok.set_ylabel("tokens, cumulative")
    _time_axis(tok, tz, f"delivery window / market time ({tz.key})")
    return _png(fig)


def lems(m: Lems, tz: ZoneInfo) -> bytes:
    """Solved LEMs: the community buy and sell prices per LEM slot, and the tokens its
    players were credited and debited (RED slots are skipped: no tokens move)."""
    fig, (px, tk) = _figure(2, 6.0)
    mids = _dates((m.start + m.end) // 2)
    width = np.maximum((m.end - m.start) / 86400 * 0.9, 1e-4)
    solved = ~m.skipped
    px.plot(mids[solved], m.p_buy[solved], "o", ms=3, color="tab:blue", label="p_buy")
    px.plot(mids[solved], m.p_sell[solved], "o", ms=3, color="tab:orange", label="p_sell")
    if m.skipped.any():
        px.plot(mids[m.skipped], np.zeros(int(m.skipped.sum())), "x", color="tab:red", label="skipped (RED)")
    px.set_ylabel("currency per kWh")
    _legend(px, 3)
    fig.suptitle("LEM results: community prices and tokens per LEM slot")
    tk.bar(mids, m.credited / 1e6, width, color="tab:green", label="credited")
    tk.bar(mids, m.debited / 1e6, width, color="tab:red", label="debited")
    tk.axhline(0, color="0.2", lw=0.6)
    tk.set_ylabel("tokens")
    _legend(tk, 2)
    _time_axis(tk, tz, f"LEM slot ({tz.key})")
    return _png(fig)


def slas(s: Slas, most: int = 20) -> bytes:
    """SLA penalties per KPI (the `most` largest)."""
    kpis = s.kpis[:most]
    fig, (ax,) = _figure(1, max(2.5, 0.35 * len(kpis) + 1.2))
    y = np.arange(len(kpis))
    ax.barh(y, [k.amount / 1e6 for k in kpis], color="tab:red")
    ax.set_yticks(y, [f"{k.sla} / {k.kpi} ({k.penalties})" for k in kpis], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("penalties (tokens); in brackets: how many")
    fig.suptitle("SLA penalties per KPI")
    return _png(fig)
