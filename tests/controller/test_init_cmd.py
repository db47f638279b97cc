"""`microte init parity --from CONF.json --out DIR` (issue #19 item 1): the seed's sidechain
initializer file becomes a registry, tokens, a pseudonym key and a scenario that `microte
market` runs as they are, with the file's default LEM parameters in effect; a bad file is
refused with every problem named, and nothing is written.

tests/data/conf_sidechain_initializer_example.json is the seed's example, verbatim (the seed
ships no file); tests/data/conf/accounts_addresses.txt the accounts file it names, in the
reference reader's format (tests/data/README.md).
"""

from __future__ import annotations

import copy
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import socketio

from controller import cli
from controller.scenario import load_scenario
from controller.sim import market_process
from ledger.digest import read_rows
from market.community.messages import SEED_DEFAULTS, LemParams
from market.community.pseudonyms import hmac_pseudonym, read_key
from market.core.registry import Registry, token_digest
from tests.e2e.test_grid_pseudonyms import good, service

DATA = Path(__file__).parents[1] / "data"
SEED = DATA / "conf_sidechain_initializer_example.json"
T = 1_699_963_200  # 12:00 UTC
Q = 900


def init(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["init", "parity", "--from", str(source), "--out", str(out), *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def tokens(out: Path) -> dict[str, str]:
    with open(out / "tokens.toml", "rb") as f:
        return {e["id"]: e["token"] for e in tomllib.load(f)["participants"]}


def test_the_seed_example_makes_a_registry_and_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "community"
    code, stdout, err = init(capsys, SEED, out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["registry.toml", "scenario.toml", "tokens.toml"]  # service: no key
    assert (out / "tokens.toml").stat().st_mode & 0o777 == 0o600
    assert (out / "registry.toml").stat().st_mode & 0o777 == 0o600 and out.stat().st_mode & 0o777 == 0o700
    registry = Registry.from_toml(out / "registry.toml")
    assert {p: registry.roles(p) for p in registry.ids()} == {
        "AGG": ("aggregator",),
        "DSO": ("dso", "operator"),  # the seed's DSO is also the market operator
        **{f"PR{i}": ("prosumer",) for i in range(1, 5)},
    }
    assert registry.address("PR3") == "cosmos1pr30q9z8x7w6v5u4t3s2r1p0n9m8l7k6j5h4g3"
    secret = tokens(out)
    assert all(registry.authenticate({"id": p, "token": t}) == (p, registry.role(p)) for p, t in secret.items())
    assert all(len(t) >= 40 and t not in stdout and t not in err for t in secret.values())  # never printed
    assert token_digest(secret["DSO"]) in (out / "registry.toml").read_text()  # the digest only
    assert secret["DSO"] not in (out / "registry.toml").read_text()
    scenario = load_scenario(out / "scenario.toml")
    parity = scenario.parity_config()
    assert parity.defaults == SEED_DEFAULTS and parity.lem_duration == 900 == scenario.step
    assert (parity.pseudonyms.service, parity.pseudonyms.enabled, parity.pseudonyms.timeout) == (
        "http://pseudo.nymi.zer",
        True,
        5.0,
    )
    assert scenario.grid.price == 0.065 and scenario.grid.fee == pytest.approx(20 / 6.5 - 1)
    assert "--host localhost --port 9119" in stdout and "DSO (dso + operator)" in stdout
    # Run again into the same directory: refused, nothing overwritten.
    before = (out / "tokens.toml").read_text()
    code, _, err = init(capsys, SEED, out)
    assert code == 2 and "refusing to overwrite" in err and str(out / "registry.toml") in err
    assert (out / "tokens.toml").read_text() == before


async def connect(url: str, pid: str, token: str, *namespaces: str) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        url, namespaces=list(namespaces), auth={"id": pid, "token": token}, transports=["websocket"], wait_timeout=5
    )
    return sio


async def ok(sio: socketio.AsyncClient, event: str, payload: Any, namespace: str = "/grid") -> dict[str, Any]:
    reply: dict[str, Any] = await sio.call(event, payload, namespace=namespace, timeout=10)
    assert reply["ok"] is True, (event, payload, reply)
    return reply


# Defaults unlike microte's built-in ones (the seed's), so the run shows that the file's apply.
OWN = [
    {"gridState": "GREEN", "pbBAU": 22.0, "psBAU": 7.0, "pbP2P": 15.0, "psP2P": 9.0, "beta": 0.0},
    {"gridState": "YELLOW", "pbBAU": 26.0, "psBAU": 6.0, "pbP2P": 15.0, "psP2P": 9.0, "beta": 0.05},
]


def variant(tmp_path: Path, change: Any = None, accounts: str | None = None) -> Path:
    """A copy of the seed's file in `tmp_path` (changed by `change(conf)`), with the accounts file."""
    conf = json.loads(SEED.read_text())
    if change is not None:
        change(conf)
    (tmp_path / "conf").mkdir(exist_ok=True)
    shutil.copy(DATA / "conf" / "accounts_addresses.txt", tmp_path / "conf" / "accounts_addresses.txt")
    if accounts is not None:
        (tmp_path / "conf" / "accounts_addresses.txt").write_text(accounts)
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(conf))
    return path


async def test_the_initialized_market_runs_as_written_with_the_files_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`microte market --registry DIR/registry.toml --scenario DIR/scenario.toml` (sim mode,
    driven by the `--controller` account): a GREEN and a YELLOW LEM are priced with the
    file's parameters, the DSO (also the operator) does both jobs, the key beside the
    registry makes the pseudonyms.

    GREEN, PR1 (1000, 0), PR2 (0, 1000): Ec = Ep = 1: p_buy = pbP2P = 15 c, p_sell = psP2P = 9 c:
    PR1 -0.15, PR2 +0.09. YELLOW, PR1 (2000, 0), PR2 (0, 1000): p_buy = (2*26 - 1*11)/2 = 20.5 c,
    p_sell = (6 + 3)/1 = 9 c, flow 1/3: PR1 -0.41 - 0.05*2/3 = -0.443333, PR2 0.09 + 0.05/3 = 0.106667."""

    def own(conf: dict[str, Any]) -> None:
        conf["pseudonymization"]["enabled"] = False  # keyed HMAC
        conf["defaultLemParameters"] = copy.deepcopy(OWN)

    out, ledger = tmp_path / "community", f"sqlite:///{tmp_path}/parity.db"
    code, _, err = init(capsys, variant(tmp_path, own), out, "--controller", "CTL")
    assert code == 0, err
    assert (out / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    secret = tokens(out)
    args = ["--registry", str(out / "registry.toml"), "--scenario", str(out / "scenario.toml")]
    async with market_process([*args, "--port", "0", "--ledger", ledger, "--round-timeout", "1"]) as url:
        ctl = await connect(url, "CTL", secret["CTL"], "/simulation")
        dso, agg = await connect(url, "DSO", secret["DSO"], "/grid"), await connect(url, "AGG", secret["AGG"], "/grid")
        pr = {p: await connect(url, p, secret[p], "/grid") for p in ("PR1", "PR2")}
        assert (await ctl.call("step", {"time": T - Q}, namespace="/simulation", timeout=10))["ok"]
        await ok(dso, "grid_state.set", {"time_delivery": [T + Q, T + 2 * Q], "state": "YELLOW"})
        for start in (T, T + Q):
            got = await ok(agg, "lem.set", {"time_delivery": [start, start + Q], "players": ["PR1", "PR2"]})
        key = read_key(out / "pseudonym.key")
        assert got["lem"]["players"] == [hmac_pseudonym(key, "PR1"), hmac_pseudonym(key, "PR2")]
        assert (await ctl.call("step", {"time": T + 2 * Q}, namespace="/simulation", timeout=10))["ok"]
        for start, energies in (
            (T, {"PR1": (1000, 0), "PR2": (0, 1000)}),
            (T + Q, {"PR1": (2000, 0), "PR2": (0, 1000)}),
        ):
            for p, (c, e) in energies.items():
                await ok(pr[p], "lem.measure", {"time_delivery": [start, start + Q], "consumption": c, "production": e})
        solved = await ok(dso, "lem.solve", {"start": T, "end": T + 2 * Q})  # the DSO as market operator
        ps1, ps2 = hmac_pseudonym(key, "PR1"), hmac_pseudonym(key, "PR2")
        assert [(x["grid_state"], x["params"], x["p_buy"], x["p_sell"], x["balances"]) for x in solved["lems"]] == [
            ("GREEN", "defaults", pytest.approx(0.15), pytest.approx(0.09), {ps1: -150_000, ps2: 90_000}),
            ("YELLOW", "defaults", pytest.approx(0.205), pytest.approx(0.09), {ps1: -443_333, ps2: 106_667}),
        ]
        for c in (ctl, dso, agg, *pr.values()):
            await c.disconnect()
    assert {r["grid_state"]: r["beta"] for r in read_rows(ledger, "lem_results")} == {"GREEN": 0.0, "YELLOW": 0.05}


async def test_the_seed_example_market_starts_in_rt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's file (external service enabled): the auction trades under the service's
    pseudonyms, so the market asks it for every account before it listens. The seed's own
    URL answers nothing: the market does not start and writes nothing. With the service
    reachable it starts on the wall clock and its accounts log in with their tokens."""
    out = tmp_path / "community"
    assert init(capsys, SEED, out)[0] == 0
    secret = tokens(out)
    args = ["--registry", str(out / "registry.toml"), "--scenario", str(out / "scenario.toml"), "--mode", "rt"]
    with pytest.raises(RuntimeError, match="exited"):
        async with market_process([*args, "--port", "0", "--ledger", f"sqlite:///{tmp_path}/down.db"]):
            pass
    assert not read_rows(f"sqlite:///{tmp_path}/down.db", "runs")
    async with service(good) as (url, asked):
        scenario = (out / "scenario.toml").read_text().replace("http://pseudo.nymi.zer", url)
        (out / "scenario.toml").write_text(scenario)
        async with market_process([*args, "--port", "0", "--ledger", f"sqlite:///{tmp_path}/rt.db"]) as m:
            dso = await connect(m, "DSO", secret["DSO"], "/grid", "/balancing")  # dso and operator
            await dso.disconnect()
        assert sorted(set(asked)) == sorted(secret)  # every account, before anyone logged in


# -- bad files: every problem named, nothing written -----------------------------------------


def drop(path: str) -> Any:
    def change(conf: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = conf
        for p in parents:
            node = node[p]
        del node[int(last) if isinstance(node, list) else last]

    return change


def put(path: str, value: Any) -> Any:
    def change(conf: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = conf
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def both(*changes: Any) -> Any:
    def change(conf: dict[str, Any]) -> None:
        for c in changes:
            c(conf)

    return change


ACCOUNTS = (DATA / "conf" / "accounts_addresses.txt").read_text()
BAD: dict[str, tuple[Any, str | None, list[str]]] = {  # name -> (change, accounts file, messages)
    "unknown key": (put("pseudonymisation", {}), None, ["unknown field `pseudonymisation`"]),
    "unknown role": (put("roles.oracles", ["PR1"]), None, ["unknown field `oracles`", "$.roles"]),
    "missing role": (drop("roles.dso"), None, ["missing required field `dso`", "$.roles"]),
    "bad grid state": (put("defaultLemParameters.1.gridState", "BLUE"), None, ["$.defaultLemParameters[1].gridState"]),
    "negative price": (put("defaultLemParameters.0.pbBAU", -1), None, ["$.defaultLemParameters[0].pbBAU"]),
    "GREEN twice": (
        put("defaultLemParameters.1.gridState", "GREEN"),
        None,
        ["defaultLemParameters[1] (GREEN): GREEN is given twice", "defaultLemParameters: no YELLOW entry"],
    ),
    "RED defaults": (
        lambda c: c["defaultLemParameters"].append({**c["defaultLemParameters"][0], "gridState": "RED"}),
        None,
        ["defaultLemParameters[2] (RED): a RED slot is not priced as P2P"],
    ),
    "prices out of order": (
        put("defaultLemParameters.0.pbP2P", 25.0),
        None,
        ["defaultLemParameters[0] (GREEN): prices must rise psBAU <= psP2P <= pbP2P <= pbBAU", "6.5, 8.0, 25.0, 20.0"],
    ),
    "prosumer without account": (
        put("roles.prosumers", ["PR1", "PR2", "PR3", "PR4", "PR5"]),
        None,
        ["roles: 'PR5' has no line in conf/accounts_addresses.txt"],
    ),
    "account without role": (
        None,
        ACCOUNTS + "PR9,cosmos1pr90q9z8x7w6v5u4t3s2r1p0n9m8l7k6j5h4g3\n",
        ["conf/accounts_addresses.txt: 'PR9' has no role"],
    ),
    "malformed account line": (
        None,
        ACCOUNTS.replace("PR2,cosmos1pr2", "PR2 cosmos1pr2"),
        ["conf/accounts_addresses.txt:5: expected ID,ADDRESS", "'PR2' has no line"],
    ),
    "address twice": (
        None,
        ACCOUNTS.replace("cosmos1pr2", "cosmos1pr1"),
        ["conf/accounts_addresses.txt:5: address 'cosmos1pr10q9z8x7w6v5u4t3s2r1p0n9m8l7k6j5h4g3' of 'PR2' is already"],
    ),
    "prosumer twice": (put("roles.prosumers", ["PR1", "PR2", "PR3", "PR4", "PR1"]), None, ["'PR1' is listed twice"]),
    "prosumer is the aggregator": (
        put("roles.aggregator", "PR1"),
        None,
        ["roles.prosumers[0]: 'PR1' is also the aggregator", "'AGG' has no role"],
    ),
    "bad id": (put("roles.prosumers", ["PR 1"]), None, ["$.roles.prosumers[0]"]),
    "service URL": (
        put("pseudonymization.pseudonomizerWebService", "pseudo.nymi.zer"),
        None,
        ["pseudonymization.pseudonomizerWebService: 'pseudo.nymi.zer' is not an http(s) URL"],
    ),
    "timeout 0": (put("pseudonymization.timeout", 0), None, ["$.pseudonymization.timeout"]),
    "endpoint": (
        put("sidechainRestApi", "localhost:9119"),
        None,
        ["sidechainRestApi: 'localhost:9119' is not an http://HOST:PORT address"],
    ),
    "no accounts file": (put("accountsAddressesfile", "conf/nope.txt"), None, ["'conf/nope.txt' not found (looked at"]),
    "several at once": (
        both(
            put("sidechainRestApi", "ftp://x"),
            put("defaultLemParameters.1.psP2P", 30.0),
            drop("defaultLemParameters.0"),
        ),
        ACCOUNTS + "X,cosmos1x\n",
        ["sidechainRestApi: 'ftp://x'", "(YELLOW): prices must rise", "no GREEN entry", "'X' has no role"],
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_file_is_refused_naming_each_problem(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, accounts, messages = BAD[name]
    source, out = variant(tmp_path, change, accounts), tmp_path / "out"
    code, stdout, err = init(capsys, source, out)
    assert code == 2 and stdout == ""
    for message in messages:
        assert message in err, (name, message, err)
    assert all(line.startswith("microte init parity: ") for line in err.splitlines())
    assert not out.exists()  # nothing written


def test_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "conf.json"
    source.write_text("{'accountsAddressesfile': 1}")
    code, _, err = init(capsys, source, tmp_path / "out")
    assert code == 2 and f"{source}: not JSON" in err
    code, _, err = init(capsys, tmp_path / "missing.json", tmp_path / "out")
    assert code == 2 and "missing.json: No such file or directory" in err
    assert LemParams(20.0, 6.5, 14.0, 8.0, 0.0) == SEED_DEFAULTS["GREEN"]  # the file's numbers are the seed's
