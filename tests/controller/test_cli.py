"""The `microte` command line (controller/cli.py): a command's module is imported only when
that command runs, so `microte --help` and parsing `microte sim` stay fast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from controller import cli

HEAVY = ("socketio", "engineio", "aiohttp", "sqlalchemy", "dataset", "helics", "matplotlib", "pandapower")


def imported_after(code: str) -> list[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    names: list[str] = json.loads(out.strip().splitlines()[-1])
    return names


def test_the_command_list_and_parsing_sim_import_no_command_stack():
    assert imported_after("import controller.cli as c\nc.parser(['sim', 's.toml', '--transport', 'inproc'])") == []
    assert imported_after("import controller.cli as c\nc.parser(['ledger', 'digest', 'sqlite:///x.db'])") == []


def test_microte_help_lists_every_command_and_exits_quickly():
    out = subprocess.run(
        [sys.executable, "-m", "controller", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(command in out for command in cli.COMMANDS)


def test_a_command_parses_the_same_alone_as_with_every_other_set_up():
    argv = ["market", "--registry", "r.toml", "--mode", "rt", "--lem-solve-every", "900"]
    assert cli.parser(argv).parse_args(argv) == cli.parser().parse_args(argv)
    argv = ["sim", "s.toml", "--participants", "50", "--fleet", "2", "--lem-duration", "300"]
    assert cli.parser(argv).parse_args(argv) == cli.parser().parse_args(argv)


def test_an_unknown_command_is_refused_by_name():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus", "x"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "lots"])
def test_a_bad_outbox_size_is_refused_before_the_market_starts(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["market", "--registry", "r.toml", "--outbox-mib", bad]
    with pytest.raises(SystemExit) as exit_info:
        cli.parser(argv).parse_args(argv)
    assert exit_info.value.code == 2 and "not a size in MiB" in capsys.readouterr().err
    ok = ["market", "--registry", "r.toml", "--outbox-mib", "0"]  # nothing kept for `resume`: allowed
    assert cli.parser(ok).parse_args(ok).outbox_mib == 0.0
