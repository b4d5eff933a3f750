"""The `route` command's dispatch (exit status, unknown commands) and the old module names' one-line answers."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

import route.cli
from route.utils.moved import MOVED


def test_a_main_s_return_value_is_the_exit_status(monkeypatch):
    fake = types.ModuleType("route_fake_command")
    fake.main = lambda argv: 3 if argv == ["--x"] else None
    monkeypatch.setitem(sys.modules, "route_fake_command", fake)
    monkeypatch.setitem(route.cli.COMMANDS, "fake", ("route_fake_command", "a test command"))
    for argv, code in ((["fake", "--x"], 3), (["fake"], None)):
        with pytest.raises(SystemExit) as exc:
            route.cli.main(argv)
        assert exc.value.code == code


@pytest.mark.parametrize("argv, code, stream", [([], 2, "err"), (["--help"], 0, "out"), (["nope"], 2, "err")])
def test_usage_and_unknown_commands(argv, code, stream, capsys):
    with pytest.raises(SystemExit) as exc:
        route.cli.main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == code
    text = getattr(captured, stream)
    if argv == ["nope"]:
        assert text.count("\n") == 1 and "unknown command 'nope'" in text and "'sweep'" in text
    else:
        assert "usage: route COMMAND" in text and all(name in text for name in route.cli.COMMANDS)


def test_every_old_entry_point_names_a_command_that_runs_its_new_module():
    commands = {old: cmd for old, (_, cmd) in MOVED.items() if cmd}
    assert len(commands) >= 17
    for old, cmd in commands.items():
        assert route.cli.COMMANDS[cmd][0] == MOVED[old][0], old
        importlib.util.find_spec(MOVED[old][0])  # the new module exists


@pytest.mark.parametrize("old", ["route.sweep", "route.tiered.pretrain", "route.config"])
def test_old_names_fail_with_one_line(old, monkeypatch, capsys):
    with pytest.raises(ModuleNotFoundError) as exc:  # an import: the new place (of its old parent package, if moved)
        importlib.import_module(old)
    name = str(exc.value).split(" moved to ")[0]
    assert old.startswith(name) and str(exc.value).startswith(f"{name} moved to {MOVED[name][0]}")
    monkeypatch.setattr(sys, "argv", ["-m"])  # `python -m OLD` while Python locates it
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", old, "--help"])
    with pytest.raises(SystemExit) as exc:
        importlib.util.find_spec(old)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    new, cmd = MOVED[old]
    assert err == (f"error: {old} moved: run `route {cmd}`\n" if cmd else f"error: {old} moved to {new}\n")
