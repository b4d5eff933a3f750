"""The module names of the flat layout before issue 35, and where each went.

`install()` (called once by `import route`) appends a finder to `sys.meta_path` that answers only these names (a
module that exists is found before it is asked): `python -m route.sweep` prints one line naming the new command
(`route.sweep moved: run `route sweep``) and exits with status 2; `import route.config` raises ModuleNotFoundError
naming the new module (`route.config moved to route.trainer.config`).
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

# old module: (new module, its `route` subcommand or None)
MOVED: dict[str, tuple[str, str | None]] = {
    "route.errors": ("route.utils.errors", None), "route.io": ("route.utils.io", None),
    "route.logs": ("route.utils.logs", None), "route.threads": ("route.utils.threads", None),
    "route.kernels": ("route.utils.kernels", None), "route.optim": ("route.masks.optim", None),
    "route.detectors": ("route.monitors.detectors", None),
    "route.monitor_classifier": ("route.monitors.classifier", None),
    "route.organism": ("route.models.organism", "organism"),
    "route.pretrained": ("route.models.pretrained", "pretrained"),
    "route.evaluate": ("route.experiments.evaluate", "evaluate"),
    "route.sgtm": ("route.models.sgtm", None), "route.sgtm.pretrain": ("route.models.sgtm.pretrain", "sgtm"),
    "route.tiered": ("route.models.tiered", None), "route.tiered.pretrain": ("route.models.tiered.pretrain", "tiered"),
    "route.tiered.keygen": ("route.models.tiered.keygen", "tiered-keygen"),
    "route.tiered.probes": ("route.models.tiered.probes", "tiered-probes"),
    "route.heads": ("route.models.heads", None), "route.heads.train": ("route.models.heads.train", "heads"),
    "route.heads.evaluate": ("route.models.heads.evaluate", "heads-evaluate"),
    "route.svd": ("route.targets.svd", None), "route.absorption": ("route.targets.absorption", None),
    "route.vllm_sync": ("route.vllm.sync", None), "route.vllm_serve": ("route.vllm.serve", "serve"),
    "route.config": ("route.trainer.config", None), "route.cli": ("route.trainer.parse", None),
    "route.rollout": ("route.trainer.rollout", None), "route.policy": ("route.trainer.policy", None),
    "route.logprobs": ("route.trainer.logprobs", None), "route.scales": ("route.trainer.scales", None),
    "route.sweep": ("route.experiments.sweep", "sweep"), "route.sweep_spec": ("route.experiments.sweep_spec", None),
    "route.sweep_plots": ("route.experiments.sweep_plots", None),
    "route.selection": ("route.experiments.selection", "select"),
    "route.selection_probes": ("route.experiments.selection_probes", None),
    "route.selection_organisms": ("route.experiments.selection_organisms", None),
    "route.compare": ("route.experiments.compare", "compare"), "route.pareto": ("route.experiments.pareto", "pareto"),
    "route.report": ("route.experiments.report", "report"), "route.relearn": ("route.experiments.relearn", "relearn"),
    "route.vhack": ("route.experiments.vhack", "vhack"),
}


def message(old: str) -> str:
    """The one line for an old name: the command to run when it was an entry point, else the new module."""
    new, command = MOVED[old]
    return f"{old} moved: run `route {command}`" if command else f"{old} moved to {new}"


class MovedFinder(MetaPathFinder):
    """Answers the old names only: one line and exit 2 under `python -m`, ModuleNotFoundError on import."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name not in MOVED:
            return None
        run = _run_module()
        if run is not None and (run == name or run.startswith(name + ".")):
            sys.stderr.write(f"error: {message(run if run in MOVED else name)}\n")
            sys.exit(2)
        new, command = MOVED[name]
        raise ModuleNotFoundError(f"{name} moved to {new}" + (f" (command: `route {command}`)" if command else ""),
                                  name=name)


def _run_module() -> str | None:
    """The module of `python -m MODULE` while Python is still locating it (sys.argv[0] is then '-m'), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
