"""What each market of a district traded (docs/hierarchy.md), from its ledger: the table
`microte sim DISTRICT.toml` prints and `microte report` puts on the markets' index page."""

from __future__ import annotations

from ledger import read_rows
from market.core.hierarchy import UPSTREAM_ID


def summary(urls: dict[str, str]) -> list[str]:
    lines = [f"{'market':<12} {'P2P kWh':>9} {'via upstream kWh':>17} {'grid in kWh':>12} {'grid out kWh':>13}  ledger"]
    for market, url in urls.items():
        p2p = up = grid_in = grid_out = 0
        for t in read_rows(url, "transactions"):
            if t["kind"] in ("p2p", "bess_compensation"):
                if UPSTREAM_ID in (t["seller_id"], t["buyer_id"]):
                    up += t["quantity"]
                else:
                    p2p += t["quantity"]
            elif t["kind"] == "grid_buy":
                grid_in += t["quantity"]
            elif t["kind"] == "grid_sell":
                grid_out += t["quantity"]
        kwh = f"{p2p / 1000:>9.1f} {up / 1000:>17.1f} {grid_in / 1000:>12.1f} {grid_out / 1000:>13.1f}"
        lines.append(f"{market:<12} {kwh}  {url}")
    return lines
