"""`--help` of every command line: every option has help and shows its default once, enum fields show their choices,
`--config` is listed where a YAML file is read, the main job's routing and target fields come first under their own
headings, and negated booleans have their own text. In-process: `main(["--help"])` with stdout captured."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from route.utils.errors import HelpFormatter

HELP_ARGV = {  # every command line of the package (test_every_command_line_is_listed)
    "route.train_grpo": [["--help"]],
    "route.experiments.evaluate": [["--help"]],
    "route.experiments.relearn": [["--help"]],
    "route.experiments.sweep": [["--help"]],
    "route.experiments.report": [["--help"]],
    "route.experiments.pareto": [["--help"]],
    "route.experiments.selection": [["--help"]],
    "route.models.organism": [["--help"]],
    "route.models.pretrained": [["--help"]],
    "route.experiments.vhack": [["--help"]],
    "route.models.heads.train": [["--help"]],
    "route.models.heads.evaluate": [["--help"]],
    "route.models.sgtm.pretrain": [["--help"]],
    "route.models.tiered.pretrain": [["--help"]],
    "route.models.tiered.probes": [["--help"], ["extract", "--help"], ["leak", "--help"]],
    "route.models.tiered.keygen": [["--help"]],
    "route.vllm.serve": [["--help"]],
    **{
        f"bench.{name}": [["--help"]]
        for name in (
            "absorption_overhead",
            "coding_throughput",
            "gpu_check",
            "heads_decode",
            "routing_overhead",
            "svf_overhead",
            "vllm_rollouts",
        )
    },
}
YAML_CLIS = (
    "route.train_grpo",
    "route.experiments.relearn",
    "route.experiments.sweep",
    "route.models.heads.train",
    "route.models.sgtm.pretrain",
    "route.models.tiered.pretrain",
)
_HELP: dict[str, tuple[str, list[argparse.ArgumentParser]]] = {}


def help_of(module: str, monkeypatch, capsys) -> tuple[str, list[argparse.ArgumentParser]]:
    """(the printed help of every argv in HELP_ARGV[module], the parsers that printed it); cached per module."""
    if module not in _HELP:
        parsers: list[argparse.ArgumentParser] = []
        original = argparse.ArgumentParser.format_help

        def recording(self):
            parsers.append(self)
            return original(self)

        monkeypatch.setattr(argparse.ArgumentParser, "format_help", recording)
        texts = []
        for argv in HELP_ARGV[module]:
            with pytest.raises(SystemExit) as exc:
                importlib.import_module(module).main(argv)
            assert exc.value.code == 0
            texts.append(capsys.readouterr().out)
        monkeypatch.undo()
        _HELP[module] = ("\n".join(texts), parsers)
    return _HELP[module]


def test_every_command_line_is_listed():
    from tests.test_cli_errors import CASES  # the table checked against every `@cli(...)` main of the package

    assert set(HELP_ARGV) == {m for m, _, _ in CASES}


@pytest.mark.parametrize("module", list(HELP_ARGV))
def test_every_option_has_help_and_a_default(module, monkeypatch, capsys):
    text, parsers = help_of(module, monkeypatch, capsys)
    assert len(parsers) == len(HELP_ARGV[module])
    checked = 0
    for parser in parsers:
        assert "--debug" in parser._option_string_actions, f"{module}: --debug not listed"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"{module} {name}: no help"
            shown = HelpFormatter("x")._expand_help(action)
            if action.option_strings and not action.required:
                assert shown.count("(default") == 1, f"{module} {name}: {shown!r}"
            checked += 1
    assert checked >= 2
    assert "%(default)" not in text


@pytest.mark.parametrize("module", YAML_CLIS)
def test_config_is_listed(module, monkeypatch, capsys):
    text, _ = help_of(module, monkeypatch, capsys)
    assert re.search(r"^  --config FILE\.yaml", text, re.M), text[:2000]


def test_main_job_sections_choices_and_negations(monkeypatch, capsys):
    from route.targets import available_targets

    text, _ = help_of("route.train_grpo", monkeypatch, capsys)
    headings = re.findall(r"^(\S[^\n]*):$", text, re.M)
    assert headings[:2] == ["options", "routing"]
    assert {"target: dual_lora", "target: svf", "target: sgtm"} <= set(headings)
    assert headings[-1].startswith("inherited from")
    assert text.index("\nrouting:") < text.index("--intervention") < text.index("\ninherited from")
    assert text.index("\ninherited from") < text.index("--learning_rate")
    assert text.index("--config FILE.yaml") < text.index("\nrouting:")
    assert f"--target {{{','.join(available_targets())}}}" in text
    for enum in (
        "--intervention {none,filter,penalty,route,erase}",
        "--detector {noisy,ground_truth}",
        "--unflagged_mode {default,retain}",
        "--generation_policy {full,deployed}",
        "--env {arith,",
        "--sgtm_strategy {",
        "--route_score {none,cosine}",
        "--monitor {plain,",
    ):
        assert enum in text, enum
    entry = re.search(r"  --lora_alpha .*?\n((?:                        .*\n)+)", text).group(1)
    assert entry.count("default") == 1, entry
    positive = re.search(r"  --sgtm_mask_shared .*?\n((?:                        .*\n)+)", text).group(1)
    negative = re.search(r"  --no_sgtm_mask_shared.*?\n((?:                        .*\n)+)", text).group(1)
    assert positive != negative and "false" in negative and "(default" in negative


def test_negated_booleans_have_their_own_text(monkeypatch, capsys):
    _, parsers = help_of("route.models.sgtm.pretrain", monkeypatch, capsys)
    actions = parsers[0]._option_string_actions
    assert actions["--no_progress"].help != actions["--progress"].help
    assert "progress to false" in actions["--no_progress"].help


@pytest.mark.parametrize(
    ("module", "flag", "values"),
    [
        ("route.experiments.evaluate", "--env", "{arith,"),
        ("route.experiments.relearn", "--method", "{grpo,sft}"),
        ("route.models.heads.train", "--head", "{iav,mav}"),
        ("route.models.sgtm.pretrain", "--architecture", "{gpt_neo,llama,qwen2}"),
        ("route.models.sgtm.pretrain", "--retain_mode", "{default,retain}"),
        ("route.models.sgtm.pretrain", "--masking_strategy", "{parameter_masking,"),
        ("route.models.tiered.pretrain", "--layout", "{public,keyed}"),
    ],
)
def test_enum_options_show_their_choices(module, flag, values, monkeypatch, capsys):
    text, _ = help_of(module, monkeypatch, capsys)
    assert f"{flag} {values}" in text
