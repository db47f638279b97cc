"""The run report's one HTML page: self-contained (inline CSS, the figures as base64 PNG
data URIs, no script, no font or file from anywhere else), so it opens offline and can be
mailed as one file.

Every headline number is also in the page as data: `<tr data-kpi="NAME" data-value="V">`
(V as computed: Wh, micro-currency, shares from 0 to 1) and one `<tr data-participant=...>`
per bill, so a test or a script reads what a person reads.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from zoneinfo import ZoneInfo

import numpy as np

from controller.report import Bill, Summary, money
from controller.run_report.queries import Flex, Grid, LedgerData, Lems, Slas

BILLS_SHOWN = 25  # bills listed before the rest fold into <details>

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1140px; padding: 1rem 1.5rem 3rem; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.meta { color: #555; font-size: 0.9rem; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { padding: 0.2rem 0.7rem; border-bottom: 1px solid #eee; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
table.kpis td.v { font-weight: 600; text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.source { color: #555; font-size: 0.85rem; }
.omitted { color: #777; font-style: italic; }
.note { background: #fff8e1; border-left: 3px solid #f2c94c; padding: 0.3rem 0.7rem; }
code { font-size: 0.85em; background: #f5f5f5; padding: 0 0.2em; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    def cells(row: Sequence[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="n">{c}</{tag}>' if i >= numeric_from else f"<{tag}>{c}</{tag}>" for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def _kwh(wh: float) -> str:
    return f"{wh / 1000:,.1f}"


def _pct(share: float) -> str:
    return f"{share:.1%}"


def _when(seconds: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _figure(figures: Mapping[str, bytes], name: str, alt: str, source: str) -> str:
    return f'{_img(figures[name], alt)}<p class="source">{source} (<code>{escape(name)}</code>)</p>'


def _omitted(what: str, why: str) -> str:
    return f'<p class="omitted">{escape(what)}: omitted ({why}).</p>'


def kpi_rows(data: LedgerData, s: Summary) -> list[tuple[str, str, str, str]]:
    """(name, label, raw value, shown value) of every headline KPI."""
    rows = [
        ("rounds", "rounds processed", str(s.rounds), f"{s.rounds:,}"),
        ("participants", "participants", str(len(data.bills)), f"{len(data.bills):,}"),
        ("trades", "trades (fills)", str(s.trades), f"{s.trades:,}"),
        ("p2p_wh", "energy traded P2P", str(s.p2p_wh), f"{_kwh(s.p2p_wh)} kWh"),
        ("imported_wh", "energy imported by the participants", str(s.imported_wh), f"{_kwh(s.imported_wh)} kWh"),
        ("load_wh", "consumption", str(s.load_wh), f"{_kwh(s.load_wh)} kWh"),
        ("grid_bought_wh", "bought from the grid", str(s.grid_bought_wh), f"{_kwh(s.grid_bought_wh)} kWh"),
        ("grid_sold_wh", "sold to the grid", str(s.grid_sold_wh), f"{_kwh(s.grid_sold_wh)} kWh"),
        ("p2p_share", "P2P share of imports", repr(s.p2p_share), _pct(s.p2p_share)),
        ("self_sufficiency", "self-sufficiency", repr(s.self_sufficiency), _pct(s.self_sufficiency)),
    ]
    if data.bills.grid_only is not None:
        saved = sum(b.grid_only - b.market for b in s.bills)
        rows.append(("community_saving", "community saving vs. grid only", str(saved), money(saved)))
    return rows


def _kpis(data: LedgerData, s: Summary) -> str:
    notes = {
        "p2p_share": "energy bought from neighbours / all energy imported",
        "self_sufficiency": "consumption not bought from the grid",
        "community_saving": "sum of (grid-only bill - market bill), currency units",
    }
    body = "".join(
        f'<tr data-kpi="{name}" data-value="{escape(raw)}"><td>{escape(label)}</td>'
        f'<td class="v">{escape(shown)}</td><td class="source">{escape(notes.get(name, ""))}</td></tr>'
        for name, label, raw, shown in kpi_rows(data, s)
    )
    return f'<table class="kpis"><tbody>{body}</tbody></table>'


def _bills_table(s: Summary, grid_only: bool) -> str:
    def row(b: Bill) -> str:
        data = (
            f'data-participant="{escape(b.participant)}" data-market="{b.market}" data-grid-only="{b.grid_only}" '
            f'data-p2p-bought="{b.p2p_bought}" data-p2p-sold="{b.p2p_sold}"'
        )
        cells = [escape(b.participant), money(b.market)]
        if grid_only:
            cells += [money(b.grid_only), money(b.grid_only - b.market)]
        cells += [_kwh(b.p2p_bought), _kwh(b.p2p_sold)]
        tds = "".join(f'<td class="n">{c}</td>' if i else f"<td>{c}</td>" for i, c in enumerate(cells))
        return f"<tr {data}>{tds}</tr>"

    header = ["participant", "bill"] + (["grid-only", "saving"] if grid_only else []) + ["P2P in kWh", "P2P out kWh"]
    head = "".join(f'<th class="n">{h}</th>' if i else f"<th>{h}</th>" for i, h in enumerate(header))
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(row(b) for b in s.bills)}</tbody></table>"
    note = '<p class="source">Bills in currency units: positive = paid, negative = earned.</p>'
    if len(s.bills) <= BILLS_SHOWN:
        return table + note
    return f"<details><summary>All {len(s.bills):,} participants' bills</summary>{table}</details>{note}"


def _grid(g: Grid | None, figures: Mapping[str, bytes]) -> str:
    if g is None:
        return _omitted("Grid states and feeder loading", "the ledger's grid_flows and grid_states tables are empty")
    counts = g.state_counts()
    body = _table(
        ["what", "value"],
        [
            ["grid_states rows (DSO decisions, revisions included)", f"{g.states:,}"],
            ["grid_flows rows (power flows: forecast and metered)", f"{g.flows:,}"],
            *[[f"slots {state}", f"{n:,}"] for state, n in counts.items()],
        ],
    )
    if "grid.png" in figures:
        loads = [v for r in g.rows for v in (r.line_loading_max, r.trafo_loading_max) if v is not None]
        volts = [v for r in g.rows for v in (r.vm_min_pu, r.vm_max_pu) if v is not None]
        extremes = []
        if loads:
            extremes.append(["highest loading (metered)", f"{max(loads):.1f} %"])
        if volts:
            extremes.append(["voltage range (metered)", f"{min(volts):.3f} - {max(volts):.3f} pu"])
        body += _table(["feeder", "value"], extremes) if extremes else ""
        body += _figure(
            figures,
            "grid.png",
            "voltage and loading per slot",
            "From <code>grid_flows</code> (vm_min_pu, vm_max_pu, line_loading_max, trafo_loading_max; kind metered "
            "and forecast) and <code>grid_states</code> (state, last revision per slot), as <code>microte "
            "grid-report</code> draws them; P2P volume and prices from <code>settlements</code>",
        )
    else:
        body += (
            '<p class="source">No power flows (<code>grid_flows</code> is empty): the DSO\'s states shade the '
            "clearing-price figure.</p>"
        )
    return _section("grid", "Grid states and feeder loading", body)


def _flex(f: Flex | None, figures: Mapping[str, bytes]) -> str:
    if f is None:
        return _omitted("Flexibility requests and token moves", "the ledger's flex_requests table is empty")
    checked, met = int(f.checked.sum()), int(f.met.sum())
    rows = [
        ["requests", f"{int(f.requests.sum()):,} in {len(f.start):,} delivery windows"],
        ["allocation strategies", escape(", ".join(f.strategies))],
        ["requested |power| (sum)", f"{int(f.requested.sum()) / 1000:,.1f} kW"],
        ["allocated (sum)", f"{int(f.allocated.sum()) / 1000:,.1f} kW"],
        ["shortfall (sum)", f"{int(f.shortfall.sum()) / 1000:,.1f} kW"],
        ["delivery checks met", f"{met:,} of {checked:,}" + (f" ({met / checked:.0%})" if checked else "")],
        ["flexibility expected / delivered", f"{_kwh(int(f.expected.sum()))} / {_kwh(int(f.delivered.sum()))} kWh"],
    ]
    rows += [[f"tokens: {escape(r)}", f"{n:,} moves, {money(a)}"] for r, (n, a) in sorted(f.tokens.items())]
    body = _table(["what", "value"], rows) + _figure(
        figures,
        "flex.png",
        "flexibility requests, deliveries and tokens",
        "From <code>flex_requests</code> (power, allocated, shortfall per delivery window), "
        "<code>flex_deliveries</code> (expected, delivered, met) and <code>flex_tokens</code> (amount by reason)",
    )
    return _section("flex", "Flexibility requests and token moves", body)


def _lems(m: Lems | None, figures: Mapping[str, bytes]) -> str:
    if m is None:
        return _omitted("LEM results", "the ledger's lem_results table is empty")
    solved = ~m.skipped
    rows = [
        ["LEM slots solved / skipped (RED)", f"{int(solved.sum()):,} / {int(m.skipped.sum()):,}"],
        ["players per LEM (mean)", f"{float(np.mean(m.players)):.1f}"],
        ["consumption Ec / production Ep", f"{_kwh(int(m.consumption.sum()))} / {_kwh(int(m.production.sum()))} kWh"],
        ["tokens credited / debited", f"{money(int(m.credited.sum()))} / {money(int(m.debited.sum()))}"],
        ["token transfers (kind lem)", f"{m.transfers:,}, {money(m.transferred)}"],
    ]
    body = _table(["what", "value"], rows) + _figure(
        figures,
        "lem.png",
        "LEM prices and tokens",
        "From <code>lem_results</code> (p_buy, p_sell, amount, grid_state, skipped per LEM slot) and "
        "<code>token_transfers</code> of kind <code>lem</code>",
    )
    return _section("lem", "LEM results", body)


def _slas(s: Slas | None, figures: Mapping[str, bytes], tz: ZoneInfo) -> str:
    if s is None:
        return _omitted("SLA penalties", "the ledger's slas and sla_results tables are empty")

    def period(a: int | None, b: int | None) -> str:
        return f"{_when(a, tz)} - {_when(b, tz)}" if a is not None and b is not None else ""

    shown = s.slas[:50]
    body = _table(
        ["SLA", "period", "KPIs", "checked", "penalties", "amount"],
        [
            [escape(r.sla), period(r.start, r.end), str(r.kpis), _yes(r.solved), f"{r.penalties:,}", money(r.amount)]
            for r in shown
        ],
        numeric_from=2,
    )
    if len(s.slas) > len(shown):
        body += f'<p class="source">... and {len(s.slas) - len(shown):,} more SLAs.</p>'
    body += f"<p>{s.penalties:,} penalty transfers, {money(s.amount)} in all.</p>"
    if s.payers:
        body += "<h3>Who paid the most</h3>" + _table(
            ["player", "penalties", "amount"], [[escape(p), f"{n:,}", money(a)] for p, n, a in s.payers]
        )
    if "sla.png" in figures:
        body += _figure(
            figures,
            "sla.png",
            "SLA penalties per KPI",
            "From <code>slas</code>, <code>sla_results</code> (penalties, amount) and <code>token_transfers</code> "
            "of kind <code>sla_penalty</code> (reference = the SLA, kpi_id)",
        )
    return _section("sla", "SLA penalties", body)


def render(
    data: LedgerData,
    summary: Summary,
    figures: Mapping[str, bytes],
    *,
    ledger: str,
    tz: ZoneInfo,
    notes: Sequence[str] = (),
    name: str = "ledger",
) -> str:
    """The page; `name` titles it when the ledger names no scenario (no runs row)."""
    run, slots = data.run, data.slots
    title = f"microte run report: {run.scenario or name}"
    meta = [f"ledger <code>{escape(ledger)}</code>"]
    if run.runs:
        meta.append(f"scenario {escape(run.scenario or '-')}, seed {run.seed}, mode {escape(run.mode)}")
        if run.runs > 1:
            meta.append(f"{run.runs} market starts")
    if len(slots):
        meta.append(
            f"{len(slots):,} slots of {slots.duration} s, {_when(int(slots.start[0]), tz)} to "
            f"{_when(int(slots.end[-1]), tz)}"
        )
    parts = [
        f'<header><h1>{escape(title)}</h1><p class="meta">{"; ".join(meta)}</p></header>',
        *[f'<p class="note">{escape(n)}</p>' for n in notes],
    ]
    if data.has_market:
        parts.append(_section("kpis", "Headline KPIs", _kpis(data, summary)))
        tariff = "the grid tariff of the ledger's last <code>runs</code> row" if run.tariff else "grid transactions"
        parts.append(
            _section(
                "prices",
                "Clearing price",
                _figure(
                    figures,
                    "prices.png",
                    "clearing price per slot against the grid prices",
                    "From <code>settlements</code>: sum(quantity x price_buy) / sum(quantity) per slot "
                    f"(and sellers' price_sell), the fills' lowest and highest price_buy; grid prices from {tariff}",
                ),
            )
        )
        parts.append(
            _section(
                "p2p",
                "P2P volume and fills",
                _figure(
                    figures,
                    "p2p.png",
                    "P2P volume and fills per slot",
                    "From <code>settlements</code> (count, sum(quantity) per slot) and <code>transactions</code> of "
                    "kind p2p and bess_compensation (delivered)",
                ),
            )
        )
        parts.append(
            _section(
                "mix",
                "Energy mix",
                _figure(
                    figures,
                    "energy-mix.png",
                    "energy mix per slot",
                    "From <code>transactions</code>: sum(quantity) per slot and kind (self, p2p, bess_compensation, "
                    "grid_buy above zero; grid_sell below), the battery's share of self from <code>meters</code> "
                    "consumption.bess; the line is the metered consumption (consumption.other and .bess)",
                ),
            )
        )
        parts.append(
            _section(
                "bills",
                "Bills against grid-only",
                _figure(
                    figures,
                    "bills.png",
                    "bills against grid-only per participant",
                    "Bill: sum(amount_buy) as buyer - sum(amount_sell) as seller over <code>transactions</code> "
                    "but kind self; grid-only: each <code>meters</code> row's external import at the grid buy price "
                    "less its generation at the grid sell price (controller/report.py)",
                )
                + _bills_table(summary, data.bills.grid_only is not None),
            )
        )
        parts.append(
            _section(
                "sufficiency",
                "Self-sufficiency and P2P share",
                _figure(
                    figures,
                    "sufficiency.png",
                    "self-sufficiency and P2P share over the run",
                    "Self-sufficiency: 1 - grid_buy / metered consumption; P2P share: p2p + bess_compensation / "
                    "metered imports (consumption.other.external), per slot and cumulative",
                ),
            )
        )
    else:
        parts.append(
            _omitted("Prices, P2P, energy mix, bills and KPIs", "the ledger has no transactions, fills or readings")
        )
    parts += [_grid(data.grid, figures), _flex(data.flex, figures), _lems(data.lems, figures)]
    parts.append(_slas(data.slas, figures, tz))
    footer = (
        '<footer><p class="source">Written by <code>microte report</code> from the ledger alone '
        "(docs/report.md); the figures are also in this directory as PNG files.</p></footer>"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(parts)
        + f"\n{footer}</body></html>\n"
    )
