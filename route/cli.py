"""The `route` command: one subcommand per entry point, each the module's own `main(argv)` and parser.

    route --help                      # the commands
    route sweep --config configs/sweep_default.yaml
    route sweep --help                # the subcommand's own help, as `python -m route sweep --help`

`python -m route ...` is the same command. Only the chosen subcommand's module is imported (`route --help` imports
no trainer). `accelerate launch route/train_grpo.py` stays the main job's multi-process launch (`route train` runs
the same `main` in one process).
"""

from __future__ import annotations

import importlib
import sys

# subcommand: (module with `main(argv)`, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("route.train_grpo", "the main job: GRPO with gradient routing, then the deployed policy's rates"),
    "evaluate": ("route.experiments.evaluate", "solve and hack rates of a checkpoint, or of a run at scales"),
    "sweep": ("route.experiments.sweep", "a grid of main-job runs over any fields (cells), sharded by cell index"),
    "select": ("route.experiments.selection", "a protocol's selection on validation, its report on the test split"),
    "relearn": ("route.experiments.relearn", "relearn probe: how fast the hack comes back under RL or SFT steps"),
    "report": ("route.experiments.report", "aggregate results.json files into a markdown table, per arm over seeds"),
    "compare": ("route.experiments.compare", "paired-seed comparison of arms, with 95% bootstrap intervals"),
    "pareto": ("route.experiments.pareto", "Pareto figures: deployed solve against deployed hack, per monitor part"),
    "vhack": ("route.experiments.vhack", "extract a hack subspace for the svf target"),
    "organism": ("route.models.organism", "build or ship a CPU model organism"),
    "pretrained": ("route.models.pretrained", "convert a pretrained GGUF model (short name or path) into a checkpoint"),
    "sgtm": ("route.models.sgtm.pretrain", "SGTM pretraining: localise a capability in reserved dims, ablate"),
    "tiered": ("route.models.tiered.pretrain", "tiered pretraining under a secret permutation key"),
    "tiered-keygen": ("route.models.tiered.keygen", "draw a random valid tiered permutation key and save it as JSON"),
    "tiered-probes": ("route.models.tiered.probes", "extraction and partial-key leak probes of a trained tiered run"),
    "heads": ("route.models.heads.train", "preference-train an IAV or MAV alignment head (and the bias baseline)"),
    "heads-evaluate": ("route.models.heads.evaluate", "the alpha dial of trained heads on held-out prompts"),
    "serve": ("route.vllm.serve", "TRL's vLLM server for a trainer without CUDA, weights over HTTP"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: route COMMAND [ARGS ...]   (route COMMAND --help: that command's flags)\n\n"
            "GRPO post-training with gradient routing into an ablatable quarantine.\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"error: route: unknown command {name!r}; allowed values: {list(COMMANDS)}\n")
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    prog, sys.argv[0] = sys.argv[0], f"route {name}"  # parsers that take their name from argv[0] (TrlParser)
    try:
        raise SystemExit(module.main(rest))  # a main's return value is the exit status (None: 0)
    finally:
        sys.argv[0] = prog
