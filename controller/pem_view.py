"""A PEM site's run read back from the ledger (docs/pem.md): per slot the feeder's load
against its capacity, the houses' temperatures against their band, packets and prices;
the comparison figures of docs/pem.md, and the figure PEMT-CoSim's plotFig draws.

Everything comes from the ledger's tables (`pem_slots`, `house_slots`, `meters`,
`transactions`), summed in SQL per slot, so the figures can be redone by anyone with the
database alone. matplotlib is imported only when plotting (Agg backend).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import sqlalchemy as sa

from ledger.schema import TABLE_MAP


class PemSlot(msgspec.Struct):
    """One slot of a PEM site. Powers in W (slot averages unless `peak`), energy in Wh."""

    start: int
    end: int
    capacity_w: int | None
    target_w: int | None
    hvac_wh: int
    hvac_peak_w: int
    feeder_w: float  # every participant's net import at the feeder head (meters)
    requested: int
    accepted: int
    air_min: float  # over the site's houses and the slot's steps
    air_mean: float  # mean of the houses' slot-start temperatures
    air_max: float
    band_low: float  # the tightest band edges over the houses
    band_high: float
    kh_above: float
    kh_below: float
    outdoor_c: float
    bought_p2p_wh: int  # the site's fills delivered through P2P
    bought_grid_wh: int
    paid: int  # micro-currency the site paid for the slot (net of anything it received)


class PemRun(msgspec.Struct):
    """The comparison figures of docs/pem.md for one site."""

    site: str
    mode: str
    houses: int
    slots: int
    peak_feeder_kw: float
    slots_over: int  # slots whose feeder load (slot average) exceeded the capacity
    steps_over_target: int  # device steps whose HVAC load exceeded the coordinator's target
    kh_above: float
    kh_below: float
    max_excursion_k: float
    hvac_kwh: float
    paid: float  # currency units
    requested: int
    accepted: int


def read_pem(conn: sa.Connection, site: str | None = None) -> list[PemSlot]:
    """The slots of `site` (default: the ledger's only PEM site), in time order."""
    ps, hs, meters, tx = (TABLE_MAP[t] for t in ("pem_slots", "house_slots", "meters", "transactions"))
    sites = sorted(r[0] for r in conn.execute(sa.select(ps.c.site).distinct()))
    if not sites:
        return []
    if site is None:
        if len(sites) > 1:
            raise ValueError(f"the ledger has {len(sites)} PEM sites ({', '.join(sites)}): name one")
        site = sites[0]
    houses = {
        r.start: r
        for r in conn.execute(
            sa.select(
                hs.c.time_delivery_start.label("start"),
                sa.func.min(hs.c.air_min).label("air_min"),
                sa.func.avg(hs.c.air_start).label("air_mean"),
                sa.func.max(hs.c.air_max).label("air_max"),
                sa.func.max(hs.c.band_low).label("band_low"),
                sa.func.min(hs.c.band_high).label("band_high"),
                sa.func.sum(hs.c.kh_above).label("kh_above"),
                sa.func.sum(hs.c.kh_below).label("kh_below"),
            )
            .where(hs.c.site == site)
            .group_by(hs.c.time_delivery_start)
        )
    }
    feeder: dict[int, int] = defaultdict(int)  # net import Wh per slot start
    for start, gen, con in conn.execute(
        sa.select(meters.c.time_interval_start, meters.c.generation, meters.c.consumption)
    ):
        feeder[start] += json.loads(con).get("other", {}).get("external", 0) - sum(json.loads(gen).values())
    money: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # p2p Wh, grid Wh, paid
    for start, kind, qty, buy, sell, buyer in conn.execute(
        sa.select(
            tx.c.time_delivery_start, tx.c.kind, tx.c.quantity, tx.c.amount_buy, tx.c.amount_sell, tx.c.buyer_id
        ).where(sa.or_(tx.c.buyer_id == site, tx.c.seller_id == site))
    ):
        m = money[start]
        if buyer == site:
            m[0 if kind in ("p2p", "bess_compensation") else 1] += qty if kind != "financial" else 0
            m[2] += buy
        else:
            m[2] -= sell
    out: list[PemSlot] = []
    for r in conn.execute(sa.select(ps).where(ps.c.site == site).order_by(ps.c.time_delivery_start)):
        h = houses.get(r.time_delivery_start)
        d = r.time_delivery_end - r.time_delivery_start
        m = money.get(r.time_delivery_start, [0, 0, 0])
        out.append(
            PemSlot(
                start=r.time_delivery_start,
                end=r.time_delivery_end,
                capacity_w=r.capacity_w,
                target_w=r.target_w,
                hvac_wh=r.load_wh,
                hvac_peak_w=r.peak_w,
                feeder_w=feeder.get(r.time_delivery_start, 0) * 3600 / d,
                requested=r.requested,
                accepted=r.accepted,
                air_min=float(h.air_min) if h else float("nan"),
                air_mean=float(h.air_mean) if h else float("nan"),
                air_max=float(h.air_max) if h else float("nan"),
                band_low=float(h.band_low) if h else float("nan"),
                band_high=float(h.band_high) if h else float("nan"),
                kh_above=float(h.kh_above) if h else 0.0,
                kh_below=float(h.kh_below) if h else 0.0,
                outdoor_c=r.outdoor_c,
                bought_p2p_wh=m[0],
                bought_grid_wh=m[1],
                paid=m[2],
            )
        )
    return out


def read_houses(conn: sa.Connection, site: str, houses: int = 4) -> dict[int, list[tuple[int, float, float, float]]]:
    """The first `houses` houses of `site`: per slot (start, air at its start, band low, band high)."""
    hs = TABLE_MAP["house_slots"]
    out: dict[int, list[tuple[int, float, float, float]]] = defaultdict(list)
    q = sa.select(hs.c.house, hs.c.time_delivery_start, hs.c.air_start, hs.c.band_low, hs.c.band_high).where(
        hs.c.site == site, hs.c.house < houses
    )
    for house, start, air, low, high in conn.execute(q.order_by(hs.c.house, hs.c.time_delivery_start)):
        out[house].append((start, air, low, high))
    return dict(out)


def summarize_pem(conn: sa.Connection, slots: list[PemSlot], site: str | None = None) -> PemRun:
    ps, hs = TABLE_MAP["pem_slots"], TABLE_MAP["house_slots"]
    first = conn.execute(sa.select(ps).where(ps.c.site == site) if site else sa.select(ps)).first()
    if first is None or not slots:
        raise ValueError("no PEM site on this ledger")
    over = sum(1 for s in slots if s.capacity_w is not None and s.feeder_w > s.capacity_w)
    excursion = conn.execute(
        sa.select(sa.func.max(sa.func.max(hs.c.air_max - hs.c.band_high, hs.c.band_low - hs.c.air_min))).where(
            hs.c.site == first.site
        )
    ).scalar()
    steps_over = conn.execute(sa.select(sa.func.sum(ps.c.steps_over)).where(ps.c.site == first.site)).scalar()
    return PemRun(
        site=first.site,
        mode=first.mode,
        houses=first.houses,
        slots=len(slots),
        peak_feeder_kw=max(s.feeder_w for s in slots) / 1000,
        slots_over=over,
        steps_over_target=int(steps_over or 0),
        kh_above=sum(s.kh_above for s in slots),
        kh_below=sum(s.kh_below for s in slots),
        max_excursion_k=max(0.0, float(excursion or 0.0)),
        hvac_kwh=sum(s.hvac_wh for s in slots) / 1000,
        paid=sum(s.paid for s in slots) / 1e6,
        requested=sum(s.requested for s in slots),
        accepted=sum(s.accepted for s in slots),
    )


def plot_pem(
    slots: list[PemSlot],
    path: Path,
    *,
    houses: dict[int, list[tuple[int, float, float, float]]] | None = None,
    timezone: str = "UTC",
    title: str = "",
) -> None:
    """House temperatures against their band, packets requested and accepted, feeder load
    against its capacity, and what the site bought at which price: the panels of
    PEMT-CoSim's plotFig, one point per slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    tz = ZoneInfo(timezone)

    def when(s: int) -> datetime:
        return datetime.fromtimestamp(s, UTC).astimezone(tz)

    mid = [when((s.start + s.end) // 2) for s in slots]
    width = (slots[0].end - slots[0].start) / 86400 * 0.9 if slots else 0.01
    fig, (t_ax, k_ax, f_ax, m_ax) = plt.subplots(4, 1, figsize=(11, 11), sharex=True, constrained_layout=True)
    # Each house has its own band (setpoints differ): a few houses, each with its band.
    for i, (house, rows) in enumerate(sorted((houses or {}).items())):
        colour = f"C{i}"
        at = [when(r[0]) for r in rows]
        t_ax.plot(at, [r[1] for r in rows], color=colour, lw=1.2, label=f"house {house}")
        t_ax.step(at, [r[2] for r in rows], where="post", color=colour, ls=":", lw=0.8)
        t_ax.step(at, [r[3] for r in rows], where="post", color=colour, ls=":", lw=0.8)
    t_ax.plot(mid, [s.air_mean for s in slots], color="black", lw=1.5, label="mean of all houses")
    t_ax.set_ylabel("indoor (C); dotted: bands")
    o_ax = t_ax.twinx()
    o_ax.plot(mid, [s.outdoor_c for s in slots], color="0.5", ls="--", lw=0.8)
    o_ax.set_ylabel("outdoor (C), dashed")
    t_ax.legend(loc="upper left", fontsize=8, ncols=4)
    k_ax.bar(mid, [s.requested for s in slots], width=width, color="tab:orange", alpha=0.5, label="requested")
    k_ax.bar(mid, [s.accepted for s in slots], width=width * 0.6, color="tab:green", label="accepted")
    k_ax.set_ylabel("packets per slot")
    k_ax.legend(loc="upper left", fontsize=8)
    f_ax.plot(mid, [s.feeder_w / 1000 for s in slots], color="tab:purple", label="feeder load (all meters)")
    f_ax.plot(mid, [s.hvac_wh * 3600 / (s.end - s.start) / 1000 for s in slots], color="tab:blue", label="HVAC")
    caps = [float("nan") if s.capacity_w is None else s.capacity_w / 1000 for s in slots]
    f_ax.step(mid, caps, where="mid", color="tab:red", ls="--", label="capacity")
    f_ax.step(
        mid, [float("nan") if s.target_w is None else s.target_w / 1000 for s in slots], where="mid",
        color="tab:red", lw=0.7, alpha=0.6, label="coordinator target",
    )  # fmt: skip
    f_ax.set_ylabel("kW (slot average)")
    f_ax.legend(loc="upper left", fontsize=8, ncols=4)
    m_ax.bar(mid, [s.bought_p2p_wh / 1000 for s in slots], width=width, color="tab:orange", label="P2P kWh")
    m_ax.bar(
        mid, [s.bought_grid_wh / 1000 for s in slots], width=width, bottom=[s.bought_p2p_wh / 1000 for s in slots],
        color="0.7", label="grid kWh",
    )  # fmt: skip
    m_ax.set_ylabel("bought (kWh)")
    p_ax = m_ax.twinx()
    price = [s.paid / 1e3 / ((s.bought_p2p_wh + s.bought_grid_wh) or 1) for s in slots]  # per kWh
    p_ax.plot(mid, price, "o-", ms=2, color="tab:brown")
    p_ax.set_ylabel("paid per kWh (dots)")
    m_ax.legend(loc="upper left", fontsize=8)
    m_ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=tz))  # type: ignore[no-untyped-call]
    m_ax.set_xlabel(f"slot ({timezone})")
    fig.suptitle(title or "PEM site: comfort, packets, feeder load and purchases per slot")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(slots: list[PemSlot], path: Path) -> None:
    fields = list(PemSlot.__struct_fields__)
    lines = [",".join(fields)]
    for s in slots:
        lines.append(",".join("" if (v := getattr(s, f)) is None else str(v) for f in fields))
    path.write_text("\n".join(lines) + "\n")
