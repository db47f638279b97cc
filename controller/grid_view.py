"""The grid report's rows and figure: one row per delivery slot, joining the DSO's power
flows and grid states with the P2P fills and the grid's prices, and the four-panel plot of
them (used by `microte grid-report` and by the grid section of `microte report`).
matplotlib is imported only when plotting, with the non-interactive Agg backend."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from zoneinfo import ZoneInfo

import msgspec

from market.feeder.network import Thresholds

STATE_COLOURS = {"GREEN": "#d9f2d9", "YELLOW": "#fff2b3", "RED": "#f7c6c6"}


class SlotRow(msgspec.Struct):
    """One delivery slot of the report: the metered power flow's results, the forecast's
    highest voltage and loading, the P2P fills and the grid's prices."""

    start: int
    end: int
    state: str  # the DSO's state in force (GREEN where it set none)
    source: str  # the power flows of the slot: metered | forecast | both | none
    vm_min_pu: float | None = None
    vm_max_pu: float | None = None
    line_loading_max: float | None = None
    trafo_loading_max: float | None = None
    losses_kw: float | None = None
    injection_kw: float | None = None
    forecast_vm_max_pu: float | None = None
    forecast_loading_max: float | None = None
    p2p_kwh: float = 0.0
    fills: int = 0
    p2p_price_buy: float | None = None  # volume-weighted, per kWh
    p2p_price_sell: float | None = None
    grid_price_buy: float | None = None
    grid_price_sell: float | None = None


def slot_table(
    flows: Iterable[Mapping[str, Any]],
    states: Iterable[Mapping[str, Any]],
    settlements: Iterable[Mapping[str, Any]],
    transactions: Iterable[Mapping[str, Any]] = (),
    slots: Iterable[tuple[int, int]] = (),
) -> list[SlotRow]:
    """Rows per slot (sorted), from ledger rows of `grid_flows`, `grid_states`,
    `settlements` and `transactions`; every (start, end) of `slots` has a row too, with
    its grid state, even without power flows or fills."""
    rows: dict[int, SlotRow] = {}

    def row(start: int, end: int) -> SlotRow:
        r = rows.get(start)
        if r is None:
            r = rows[start] = SlotRow(start=start, end=end, state="GREEN", source="none")
        return r

    for start, end in slots:
        row(start, end)

    by_kind: dict[str, dict[int, Mapping[str, Any]]] = {"forecast": {}, "metered": {}}
    for f in flows:
        by_kind.setdefault(f["kind"], {})[f["time_delivery_start"]] = f
    last_metered = max(by_kind["metered"], default=None)
    for start, f in by_kind["forecast"].items():
        if last_metered is not None and start > last_metered:
            continue  # the DSO looked beyond the end of the run
        r = row(start, f["time_delivery_end"])
        r.source = "forecast"
        r.forecast_vm_max_pu = f["vm_max_pu"]
        loads = [v for v in (f["line_loading_max"], f["trafo_loading_max"]) if v is not None]
        r.forecast_loading_max = max(loads) if loads else None
    for start, f in by_kind["metered"].items():
        r = row(start, f["time_delivery_end"])
        r.source = "both" if r.source == "forecast" else "metered"
        for field in ("vm_min_pu", "vm_max_pu", "line_loading_max", "trafo_loading_max", "losses_kw"):
            setattr(r, field, f[field])
        r.injection_kw = f["injection_kw"]
    revisions: dict[int, tuple[int, str, int]] = {}
    for g in states:  # the last revision counts
        start, rev = g["time_delivery_start"], g["revision"]
        if start not in revisions or rev > revisions[start][0]:
            revisions[start] = (rev, g["state"], g["time_delivery_end"])
    for start, (_rev, state, end) in revisions.items():
        for r in rows.values():  # auction slots inside (or overlapping) the LEM slot
            if r.start < end and start < r.end:
                r.state = _worse(r.state, state)
    money: dict[int, list[float]] = {}
    for s in settlements:
        r = row(s["time_delivery_start"], s["time_delivery_end"])
        r.fills += 1
        r.p2p_kwh += s["quantity"] / 1000.0
        m = money.setdefault(r.start, [0.0, 0.0])
        m[0] += s["quantity"] * s["price_buy"]
        m[1] += s["quantity"] * s["price_sell"]
    for start, (buy, sell) in money.items():
        wh = rows[start].p2p_kwh * 1000.0
        if wh > 0:
            rows[start].p2p_price_buy, rows[start].p2p_price_sell = buy / wh, sell / wh
    for t in transactions:
        start = t["time_delivery_start"]
        if start not in rows:
            continue
        if t["kind"] == "grid_buy":
            rows[start].grid_price_buy = t["price_buy"]
        elif t["kind"] == "grid_sell":
            rows[start].grid_price_sell = t["price_sell"]
    return [rows[s] for s in sorted(rows)]


def _worse(a: str, b: str) -> str:
    order = {"GREEN": 0, "YELLOW": 1, "RED": 2}
    return a if order.get(a, 0) >= order.get(b, 0) else b


def plot(
    rows: list[SlotRow], path: Path | BinaryIO, *, thresholds: Thresholds | None = None, timezone: str = "UTC"
) -> None:
    """Voltage, loading, P2P volume and prices per slot, shaded by grid state (a PNG written
    to `path`, a file name or a binary stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    t = thresholds or Thresholds()
    tz = ZoneInfo(timezone)

    def when(s: int) -> datetime:
        return datetime.fromtimestamp(s, UTC).astimezone(tz)

    mid = [when((r.start + r.end) // 2) for r in rows]
    width = (rows[0].end - rows[0].start) / 86400 * 0.9 if rows else 0.01
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True, constrained_layout=True)
    v_ax, l_ax, q_ax, p_ax = axes
    for ax in axes:
        for r in rows:
            ax.axvspan(when(r.start), when(r.end), color=STATE_COLOURS.get(r.state, "white"), lw=0, zorder=0)

    def series(attr: str) -> list[float]:
        return [float("nan") if getattr(r, attr) is None else getattr(r, attr) for r in rows]

    v_ax.plot(mid, series("vm_max_pu"), "-", color="tab:red", label="max (metered)")
    v_ax.plot(mid, series("vm_min_pu"), "-", color="tab:blue", label="min (metered)")
    v_ax.plot(mid, series("forecast_vm_max_pu"), "--", color="tab:red", alpha=0.6, label="max (forecast)")
    for y, style in ((t.v_yellow, ":"), (t.v_red, "--")):
        for v in y:
            v_ax.axhline(v, color="0.4", ls=style, lw=0.8)
    v_ax.set_ylabel("voltage (pu)")
    v_ax.legend(loc="upper left", fontsize=8, ncols=3)
    l_ax.plot(mid, series("trafo_loading_max"), "-", color="tab:purple", label="transformer")
    l_ax.plot(mid, series("line_loading_max"), "-", color="tab:green", label="max line")
    l_ax.plot(mid, series("forecast_loading_max"), "--", color="tab:purple", alpha=0.6, label="max (forecast)")
    l_ax.axhline(t.loading_yellow, color="0.4", ls=":", lw=0.8)
    l_ax.axhline(t.loading_red, color="0.4", ls="--", lw=0.8)
    l_ax.set_ylabel("loading (%)")
    l_ax.legend(loc="upper left", fontsize=8, ncols=3)
    q_ax.bar(mid, [r.p2p_kwh for r in rows], width=width, color="tab:orange", label="P2P volume")
    q_ax.set_ylabel("P2P (kWh per slot)")
    q_ax.legend(loc="upper left", fontsize=8)
    p_ax.plot(mid, series("p2p_price_buy"), "o-", ms=3, color="tab:brown", label="P2P buy (avg)")
    p_ax.plot(mid, series("p2p_price_sell"), "o-", ms=3, color="tab:olive", label="P2P sell (avg)")
    p_ax.step(mid, series("grid_price_buy"), where="mid", color="0.3", label="grid buy")
    p_ax.step(mid, series("grid_price_sell"), where="mid", color="0.6", label="grid sell")
    p_ax.set_ylabel("price (per kWh)")
    p_ax.legend(loc="upper left", fontsize=8, ncols=4)
    p_ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M", tz=tz))  # type: ignore[no-untyped-call]
    p_ax.set_xlabel(f"slot ({timezone}); shading: the DSO's grid state")
    fig.suptitle("Feeder: voltage and loading per slot next to P2P volume and prices")
    fig.savefig(path, dpi=110)
    plt.close(fig)
