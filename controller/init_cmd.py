"""`microte init parity --from CONF.json --out DIR`: a Parity market (seed 000) from the seed's
sidechain initializer file (`conf_sidechain_initializer_example.json`), as a community runs it.

The JSON has the seed's keys, and only those: `accountsAddressesfile` (lines `ID,ADDRESS`,
as the reference reads them), `pseudonymization` (`enabled`, `pseudonomizerWebService`,
`timeout`; optional), `sidechainRestApi` (where the market listens), `roles` (`prosumers`,
`dso`, `aggregator`, `marketOperator`) and `defaultLemParameters` (GREEN and YELLOW, once
each). Every problem is reported at once, each naming the entry (file, key path, id or line);
nothing is written unless the file is consistent. It writes into DIR (made 0700 if new):

- `registry.toml`: every account with its roles (the seed's DSO that is also the market
  operator holds `roles = ["dso", "operator"]`), the SHA-256 of its token and its address;
- `tokens.toml` (mode 0600): each account's token, made with `secrets`; hand each participant
  its own entry (`microte participant --registry DIR/tokens.toml` reads the file). The tokens
  are written only there, never printed;
- `pseudonym.key` (mode 0600, unless the external service is enabled): the key of the
  keyed pseudonyms, where `microte market` looks for it (beside the registry);
- `scenario.toml`: 15-minute slots, the auction's grid tariff from the GREEN BAU prices, the
  `[parity]` table with the JSON's default LEM parameters and the pseudonym settings.

It prints the files and the `microte market` command line (host and port from
`sidechainRestApi`). It refuses to overwrite any of the four files.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import tomli_w

from controller import init_pemt
from controller.scenario import load_scenario
from market.community.messages import Beta, Cents
from market.community.pseudonyms import KEY_FILE, create_key
from market.core.protocol import GridState
from market.core.registry import ParticipantId, Registry, token_digest
from participants.spec import synthetic_spec

FILES = ("registry.toml", "tokens.toml", KEY_FILE, "scenario.toml")
LEM_DURATION = 900  # the seed's 15-minute LEMs


class Pseudonymization(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool
    pseudonomizerWebService: str
    timeout: Annotated[float, msgspec.Meta(gt=0, le=300)]


class Roles(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prosumers: list[ParticipantId]
    dso: ParticipantId
    aggregator: ParticipantId
    marketOperator: ParticipantId


class DefaultLem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gridState: GridState
    pbBAU: Cents
    psBAU: Cents
    pbP2P: Cents
    psP2P: Cents
    beta: Beta


class InitFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    accountsAddressesfile: str
    sidechainRestApi: str
    roles: Roles
    defaultLemParameters: list[DefaultLem]
    pseudonymization: Pseudonymization | None = None


class InitError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Community(msgspec.Struct, frozen=True):
    """What the file describes, checked: accounts in order with their roles and addresses."""

    accounts: dict[str, tuple[list[str], str]]  # id -> (roles, address)
    defaults: dict[str, dict[str, float]]  # grid state -> LemParams fields (wire names)
    service: Pseudonymization | None  # the external pseudonymization service, if enabled
    host: str
    port: int


def load(path: Path, controller: str | None = None) -> Community:
    """The community of an initializer file; InitError listing every problem found."""
    try:
        conf = msgspec.json.decode(path.read_bytes(), type=InitFile)
    except OSError as err:
        raise InitError([f"{path}: {err.strerror or err}"]) from None
    except msgspec.ValidationError as err:
        raise InitError([f"{path}: {err}"]) from None
    except msgspec.DecodeError as err:
        raise InitError([f"{path}: not JSON: {err}"]) from None
    problems: list[str] = []
    roles = _roles(conf.roles, problems)
    if controller is not None:
        if controller in roles:
            problems.append(f"--controller {controller!r}: already an account of roles")
        roles[controller] = ["controller"]
    addresses = _accounts(path, conf.accountsAddressesfile, problems)
    if addresses is not None:
        for pid in roles:
            if pid not in addresses and pid != controller:
                problems.append(f"{path}: roles: {pid!r} has no line in {conf.accountsAddressesfile}")
        for pid in addresses:
            if pid not in roles:
                problems.append(f"{conf.accountsAddressesfile}: {pid!r} has no role in {path} roles")
    defaults = _defaults(conf.defaultLemParameters, problems)
    service = conf.pseudonymization if conf.pseudonymization and conf.pseudonymization.enabled else None
    if service is not None:
        url = urlsplit(service.pseudonomizerWebService)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(
                f"pseudonymization.pseudonomizerWebService: {service.pseudonomizerWebService!r} is not an http(s) URL"
            )
    host, port = _endpoint(conf.sidechainRestApi, problems)
    if problems:
        raise InitError(
            [p if p.startswith((str(path), conf.accountsAddressesfile)) else f"{path}: {p}" for p in problems]
        )
    accounts = {pid: (rs, (addresses or {}).get(pid, "")) for pid, rs in roles.items()}
    return Community(accounts, defaults, service, host, port)


def _roles(roles: Roles, problems: list[str]) -> dict[str, list[str]]:
    """id -> its microte roles, in the file's order (DSO, aggregator, operator, prosumers)."""
    out: dict[str, list[str]] = {}
    for key, role in (("dso", "dso"), ("aggregator", "aggregator"), ("marketOperator", "operator")):
        pid = getattr(roles, key)
        out.setdefault(pid, []).append(role)
    if not roles.prosumers:
        problems.append("roles.prosumers: empty (a LEM needs prosumers)")
    for i, pid in enumerate(roles.prosumers):
        if pid in roles.prosumers[:i]:
            problems.append(f"roles.prosumers[{i}]: {pid!r} is listed twice")
        elif pid in out:
            others = " and ".join(out[pid])
            problems.append(f"roles.prosumers[{i}]: {pid!r} is also the {others}: a prosumer holds no other role")
        else:
            out[pid] = ["prosumer"]
    return out


def _accounts(conf: Path, name: str, problems: list[str]) -> dict[str, str] | None:
    """The accounts file (relative to the JSON's directory, else to the current one, where
    the reference ran): id -> address; None (and a problem) if it cannot be read."""
    given = Path(name)
    tried = [given] if given.is_absolute() else [conf.parent / given, Path.cwd() / given]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        problems.append(f"accountsAddressesfile: {name!r} not found (looked at {', '.join(str(p) for p in tried)})")
        return None
    addresses: dict[str, str] = {}
    lines: dict[str, int] = {}
    owner: dict[str, str] = {}
    for n, line in enumerate(found.read_text().splitlines(), 1):
        if not line.strip() or "print_account_address" in line:  # the reference skips the latter
            continue
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 2 or not all(parts):
            problems.append(f"{name}:{n}: expected ID,ADDRESS, got {line!r}")
            continue
        pid, address = parts
        if pid in addresses:
            problems.append(f"{name}:{n}: {pid!r} is listed twice (first on line {lines[pid]})")
        elif address in owner:
            problems.append(f"{name}:{n}: address {address!r} of {pid!r} is already {owner[address]!r}'s")
        else:
            addresses[pid], lines[pid], owner[address] = address, n, pid
    return addresses


def _defaults(entries: list[DefaultLem], problems: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, e in enumerate(entries):
        where = f"defaultLemParameters[{i}] ({e.gridState})"
        if e.gridState == "RED":
            problems.append(f"{where}: a RED slot is not priced as P2P: its parameters would never apply")
        elif e.gridState in out:
            problems.append(f"{where}: {e.gridState} is given twice")
        elif not e.psBAU <= e.psP2P <= e.pbP2P <= e.pbBAU:
            problems.append(
                f"{where}: prices must rise psBAU <= psP2P <= pbP2P <= pbBAU (selling to the community pays "
                f"at least the grid, buying from it costs at most the grid), got {e.psBAU}, {e.psP2P}, "
                f"{e.pbP2P}, {e.pbBAU}"
            )
        else:
            out[e.gridState] = {k: getattr(e, k) for k in ("pbBAU", "psBAU", "pbP2P", "psP2P", "beta")}
    for state in ("GREEN", "YELLOW"):
        if state not in out and not any(e.gridState == state for e in entries):
            problems.append(f"defaultLemParameters: no {state} entry (a {state} LEM could not be priced)")
    return out


def _endpoint(api: str, problems: list[str]) -> tuple[str, int]:
    url = urlsplit(api)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        port = 0
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") or not port:
        problems.append(f"sidechainRestApi: {api!r} is not an http://HOST:PORT address")
        return "", 0
    return url.hostname, port


def write(community: Community, out: Path, source: Path) -> list[Path]:
    """The registry, tokens, key and scenario files in `out` (FileExistsError naming any
    that exists already; nothing is written then)."""
    paths = [out / f for f in FILES if f != KEY_FILE or community.service is None]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = {pid: secrets.token_urlsafe(32) for pid in community.accounts}
    registry = []
    for pid, (roles, address) in community.accounts.items():
        entry: dict[str, Any] = {"id": pid}
        entry.update({"role": roles[0]} if len(roles) == 1 else {"roles": roles})
        entry["token_sha256"] = token_digest(tokens[pid])
        if address:
            entry["address"] = address
        registry.append(entry)
    header = f"# microte init parity --from {source}\n"
    _write(
        out / "registry.toml",
        header
        + "# who may connect: ids, roles, token digests (the tokens are in tokens.toml)\n\n"
        + tomli_w.dumps({"participants": registry}),
    )
    _write(
        out / "tokens.toml",
        header
        + "# each account's token: hand every participant its own entry, and keep this file secret\n\n"
        + tomli_w.dumps({"participants": [{"id": p, "token": t} for p, t in tokens.items()]}),
    )
    if community.service is None:
        create_key(out / KEY_FILE)
    green = community.defaults["GREEN"]
    scenario: dict[str, Any] = {"name": "parity", "step": LEM_DURATION}
    if green["psBAU"] > 0:  # the auction trades with the grid at the GREEN business-as-usual prices
        scenario["grid"] = {"price": green["psBAU"] / 100, "fee": green["pbBAU"] / green["psBAU"] - 1}
    pseudonyms: dict[str, Any] = {}
    if community.service is not None:
        pseudonyms = {
            "service": community.service.pseudonomizerWebService,
            "enabled": True,
            "timeout": community.service.timeout,
        }
    pseudonyms["market"] = True  # the auction's rows carry pseudonyms too: no registry id on the ledger
    prosumers = [p for p, (roles, _) in community.accounts.items() if "prosumer" in roles]
    aggregator = next(p for p, (roles, _) in community.accounts.items() if "aggregator" in roles)
    scenario.update(SIM_RUN)
    scenario["parity"] = {
        "lem_duration": LEM_DURATION,
        "solve_every": 3600,
        "solve_delay": 60,
        "defaults": community.defaults,
        "pseudonyms": pseudonyms,
        "agents": agents_table(aggregator, prosumers),
    }
    scenario["participants"] = sites(prosumers)
    _write(
        out / "scenario.toml",
        header + f"# run it: {market_command(community, out)}\n\n" + tomli_w.dumps(scenario),
        mode=0o644,
    )
    return paths


SIM_RUN = {"seed": 0, "start": "2026-06-15T00:00:00Z", "days": 1}  # what `microte sim` runs


def agents_table(aggregator: str, prosumers: list[str]) -> dict[str, Any]:
    """`[parity.agents]`: the aggregator's LEMs of every prosumer, and the seed's SLA example
    (2 hours, two KPIs of 1 hour: the first half of the prosumers must keep their import
    under 1 kWh an hour, the others their export over 100 Wh an hour)."""
    half = max(1, len(prosumers) // 2)
    kpi = {"rule": "gt", "penalty": 10_000, "resolution": 3600}
    return {
        "aggregator": aggregator,
        "sla_length": 7200,
        "kpis": [
            {**kpi, "id": "KPI1", "signal": "import_wh", "limit": 1000.0, "players": prosumers[:half]},
            {**kpi, "id": "KPI2", "signal": "export_wh", "rule": "lt", "limit": 100.0, "players": prosumers[half:]},
        ][: 2 if prosumers[half:] else 1],
    }


def sites(prosumers: list[str]) -> list[dict[str, Any]]:
    """A seeded site for each prosumer (the initializer knows accounts, not devices): edit them."""
    rng = np.random.default_rng(0)
    out: list[dict[str, Any]] = []
    for pid in prosumers:
        spec = msgspec.structs.replace(synthetic_spec(len(out), rng), id=pid)
        out.append(_without_none(msgspec.to_builtins(spec)))
    return out


def _without_none(value: Any) -> Any:
    """TOML has no null: a field left out takes its default."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def market_command(community: Community, out: Path) -> str:
    return (
        f"microte market --registry {out / 'registry.toml'} --scenario {out / 'scenario.toml'} "
        f"--mode rt --host {community.host} --port {community.port}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="system", required=True)
    q = sub.add_parser("parity", help="registry and scenario from the seed's sidechain initializer JSON")
    q.add_argument("--from", dest="source", required=True, type=Path, help="conf_sidechain_initializer_example.json")
    q.add_argument("--out", required=True, type=Path, help="directory for the registry, tokens, key and scenario")
    q.add_argument("--controller", metavar="ID", help="also an account of role controller (to drive a sim-mode market)")
    q.set_defaults(init=main_parity)
    pemt = sub.add_parser("pemt", help="the PEMT-CoSim case: thermal houses, a PEM coordinator, a feeder")
    init_pemt.add_arguments(pemt)
    pemt.set_defaults(init=init_pemt.main)


def main(args: argparse.Namespace) -> int:
    init: Callable[[argparse.Namespace], int] = args.init
    return init(args)


def main_parity(args: argparse.Namespace) -> int:
    try:
        community = load(args.source, args.controller)
        paths = write(community, args.out, args.source)
    except InitError as err:
        for problem in err.problems:
            print(f"microte init parity: {problem}", file=sys.stderr)
        return 2
    except (FileExistsError, OSError) as err:
        print(f"microte init parity: {err}", file=sys.stderr)
        return 2
    Registry.from_toml(args.out / "registry.toml")  # what was written loads as it is
    load_scenario(args.out / "scenario.toml")
    for path in paths:
        print(f"wrote {path}{' (mode 0600)' if path.name != 'scenario.toml' else ''}")
    print("accounts: " + ", ".join(f"{p} ({' + '.join(rs)})" for p, (rs, _) in community.accounts.items()))
    print(f"run the market: {market_command(community, args.out)}")
    return 0
