"""Every command the README and docs/ show runs in its `--help` form, in-process (one Python process for all):
`route COMMAND ...` through the `route` command's dispatcher, `python route/train_grpo.py` and `accelerate launch
route/train_grpo.py` through the main job's `main`. A command the docs show that does not exist fails, and every
subcommand of `route` is shown somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from route.cli import COMMANDS
from route.utils.moved import MOVED

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBACTIONS = {"tiered-probes": ("extract", "leak")}  # subcommands with their own positional action


def code_of(text: str) -> list[str]:
    """The code a page shows: its fenced blocks' lines and its inline code spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return [line for block in fenced for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", rest)


def shown() -> list[tuple[str, tuple[str, ...]]]:
    """(page, argv before --help) for every command shown in the README and docs/."""
    found = []
    for page in PAGES:
        for code in code_of(page.read_text()):
            code = re.sub(r"(^|\s)#.*", "", code)  # a shell comment is prose
            for m in re.finditer(r"(?:^|&&|;|\$\(|\bdo|\bthen)\s*route ([a-z][a-z-]*)(?: ([a-z]+))?", code.strip()):
                name, sub = m.group(1), m.group(2)
                found.append((page.name, (name, sub) if sub in SUBACTIONS.get(name, ()) else (name,)))
            if re.search(r"(python|accelerate launch[^`]*?) route/train_grpo\.py", code):
                found.append((page.name, ("train",)))
    return found


def test_shown_commands_exist_and_cover_every_subcommand():
    commands = shown()
    assert len(commands) > 100  # the scan found the docs' commands (many pages, many commands)
    unknown = sorted({(page, argv[0]) for page, argv in commands if argv[0] not in COMMANDS})
    assert unknown == []
    assert {argv[0] for _, argv in commands} == set(COMMANDS)


def test_old_module_names_are_shown_only_as_moved():
    """`python -m route.X` in the docs: the main job's module (a sweep cell's command), or an old name on the page
    that explains the move."""
    for page in PAGES:
        for name in re.findall(r"python -m (route[\w.]*)", page.read_text()):
            assert name in ("route", "route.train_grpo") or (name in MOVED and page.name == "layout.md"), (page, name)


_HELP: dict[tuple[str, ...], str] = {}


@pytest.mark.parametrize("argv", sorted({argv for _, argv in shown()}), ids=" ".join)
def test_shown_command_help(argv, capsys):
    from route.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"usage: route {' '.join(argv)}")  # the subcommand's own parser answered
    _HELP[argv] = out


def test_route_help_lists_every_command_without_importing_them(capsys):
    import subprocess
    import sys

    code = ("import sys; from route.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('trl', 'torch', 'route.trainer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert all(f"  {name} " in out for name in COMMANDS)
    assert out.strip().splitlines()[-1] == "[]"  # no trainer, torch or trl imported for `route --help`


def test_main_job_script_help(monkeypatch, capsys):
    """`python route/train_grpo.py --help` (and `accelerate launch route/train_grpo.py`) as a script: Python puts
    route/ first on sys.path, where route/vllm would shadow the real vllm; the script removes it before any import."""
    import runpy
    import sys

    here = str(ROOT / "route")
    monkeypatch.setattr(sys, "path", [here, *sys.path])
    monkeypatch.setattr(sys, "argv", ["route/train_grpo.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "route" / "train_grpo.py"), run_name="__main__")
    assert exc.value.code == 0 and "--config" in capsys.readouterr().out
    assert here not in sys.path
