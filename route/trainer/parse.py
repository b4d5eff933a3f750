"""Building a run's configuration: `RoutedGRPOConfig` plus the chosen target's settings, validated before any work.

    config = parse_config(["--config", "configs/svf.yaml", "--seed", "1"])     # YAML + flags, as on the CLI
    config = build_config(target="svf", svf_reserve_axes=[0, 1], max_steps=5)  # the same from Python

Both return a `RoutedGRPOConfig` whose `target_args` holds the target's settings dataclass (`route.targets`), so
`config.svf_rank` reads through to it. Parsing is `TrlParser` over `RoutedGRPOConfig` and every registered target's
settings dataclass, the way TRL parses `ModelConfig` beside `GRPOConfig`: flag and YAML names are the fields' names.
Settings of targets other than the chosen one are ignored (a sweep over targets sets several).

`validate_run(config)` checks what needs the registries (the environment, the detector's modes, the target's
settings against the config), that the environment can grade on this machine (the coding sandbox), and the TRL
options routing cannot honour; the trainer and every command line call it before loading a model. What only the
model can tell (module names and shapes: `target_modules`, an svf subspace's rank, sgtm sizes) and the accelerate
setup are checked when the trainer is constructed, which every command line does before the model's first forward
(`route.train_grpo.run` evaluates the base policy after constructing the trainer; see its docstring).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from route.trainer.config import RoutedGRPOConfig


def _target_fields() -> dict[str, type]:
    """{field name: the settings class that owns it} over every registered target."""
    from route.targets import target_args_classes

    owners: dict[str, type] = {}
    for cls in target_args_classes():
        for f in dataclasses.fields(cls):
            if f.name in owners and owners[f.name] is not cls:
                raise TypeError(f"target settings {cls.__name__} and {owners[f.name].__name__} both define "
                                f"{f.name!r}; flag names must be unique")
            owners[f.name] = cls
    return owners


def config_fields() -> list[str]:
    """Every field a run's YAML or flags may set: the trainer config's and every target's settings."""
    own = [f.name for f in dataclasses.fields(RoutedGRPOConfig) if f.init]
    return own + [n for n in _target_fields() if n not in own]


def attach_target_args(config: RoutedGRPOConfig, settings: dict[type, Any]) -> RoutedGRPOConfig:
    """Attach the chosen target's settings (from `settings`, one instance per settings class; the defaults if absent)
    and validate the run. Other targets' settings are ignored, as a sweep over targets sets several."""
    from route.targets import target_class

    chosen = target_class(config.target).args_cls
    config.target_args = settings.get(chosen) or chosen()
    validate_run(config)
    return config


def build_config(**fields: Any) -> RoutedGRPOConfig:
    """A validated `RoutedGRPOConfig` from keyword fields, target settings included (`svf_rank=...`)."""
    owners = _target_fields()
    own = {k: v for k, v in fields.items() if k not in owners}
    config = RoutedGRPOConfig(**own)
    grouped: dict[type, dict[str, Any]] = {}
    for k, v in fields.items():
        if k in owners:
            grouped.setdefault(owners[k], {})[k] = v
    return attach_target_args(config, {cls: cls(**kw) for cls, kw in grouped.items()})


def parse_config(argv: list[str] | None = None, default_config: str | None = None) -> RoutedGRPOConfig:
    """Parse `--config FILE.yaml` plus flag overrides (flags win over the file) into a validated config.

    Same semantics as `TrlParser`, with one difference: a YAML `env:` that is a string is this config's environment
    name; a mapping is still read as environment variables to set. A bad flag or value is a ValueError naming it
    (`route.utils.errors.cli` prints it as one line).
    """
    from route.targets import target_args_classes
    from route.utils.errors import parse_dataclasses
    from route.utils.io import load_yaml_mapping, pop_config_arg

    path, argv = pop_config_arg(sys.argv[1:] if argv is None else argv, default_config)
    classes = target_args_classes()
    parser = config_parser(default_config)
    if path is not None:
        values = load_yaml_mapping(path)
        if isinstance(values.get("env"), dict):
            for key, value in values.pop("env").items():
                os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**values)
        if unknown:
            raise ValueError(f"--config {path}: unknown fields {unknown[::2]}; see --help for the fields")
    outputs = parse_dataclasses(parser, argv)  # `--config` was taken out: its value comes back last
    config, settings = outputs[0], outputs[1: 1 + len(classes)]
    return attach_target_args(config, dict(zip(classes, settings, strict=True)))


def config_parser(default_config: str | None = None) -> Any:
    """The main job's parser: `TrlParser` over `RoutedGRPOConfig` and every target's settings, with one-line errors
    (`route.utils.errors`), `--config` first, choices on `--env` and `--target`, and the help in sections: routing (this
    project's fields), one per target (`target: NAME`), then the fields inherited from GRPOConfig."""
    from trl import GRPOConfig, TrlParser

    import envs
    from route.targets import available_targets, target_args_classes, target_class
    from route.utils.errors import dataclass_parser

    classes = target_args_classes()
    _target_fields()  # refuse clashing flag names before the parser does, with a clearer message
    parser = dataclass_parser(TrlParser, (RoutedGRPOConfig, *classes))
    parser.usage = "%(prog)s [--config FILE.yaml] [--FIELD VALUE ...] [--debug]"
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of any of the fields below; flags win over "
                        f"it (default: {default_config or 'none'})")
    by_dest = {a.dest: a for a in parser._actions}
    by_dest["env"].choices = list(envs.available_envs())
    by_dest["target"].choices = available_targets()
    inherited = [f.name for f in dataclasses.fields(GRPOConfig)]
    sections = [("routing", [f.name for f in dataclasses.fields(RoutedGRPOConfig) if f.name not in inherited])]
    for cls in classes:
        names = ", ".join(n for n in available_targets() if target_class(n).args_cls is cls)
        sections.append((f"target: {names}", [f.name for f in dataclasses.fields(cls)]))
    sections.append(("inherited from TRL's GRPOConfig and transformers' TrainingArguments",
                     [n for n in inherited if n != "debug"]))  # --debug stays under options: a bare one is ours
    _sections(parser, sections)
    return parser


def _sections(parser: Any, sections: list[tuple[str, list[str]]]) -> None:
    """Move the parser's options into argument groups, in the order given (an option's `--no_x` twin follows it);
    what is left (`--help`, `--config`, `--debug`) stays first under "options"."""
    moved = set()
    for title, dests in sections:
        group = parser.add_argument_group(title)
        for dest in dests:
            for action in parser._actions:
                if action.dest == dest and action.option_strings and id(action) not in moved:
                    moved.add(id(action))
                    group._group_actions.append(action)
    for group in parser._action_groups:
        if group.title == "options":
            group._group_actions[:] = [a for a in group._group_actions if id(a) not in moved]


def flat_config(config: RoutedGRPOConfig) -> dict[str, Any]:
    """Every field of the run as one flat mapping: the trainer config's, then the target's settings."""
    derived = {f.name for f in dataclasses.fields(config) if not f.init}  # target_args, monitor_judge_path
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in derived}
    if config.target_args is not None:
        out.update(dataclasses.asdict(config.target_args))
    return out


def validate_run(config: RoutedGRPOConfig) -> Any:
    """Check the environment, the detector's modes and the target's settings; returns the target's settings.

    Raises ValueError naming the field and the allowed values. Builds nothing heavier than the environment object.
    """
    import envs
    from route.models.paths import check_model_path
    from route.monitors.build import JUDGES, validate_monitor
    from route.targets import resolve_target_args
    from route.utils.fields import choice

    check_model_path("model_name_or_path", config.model_name_or_path)  # a missing local path, before any Hub lookup
    choice("env", config.env, tuple(envs.available_envs()))
    env = envs.make_env(config.env, **config.env_kwargs)
    if config.detector_modes is not None:
        unknown = [m for m in config.detector_modes if m not in env.modes]
        if unknown:
            raise ValueError(f"detector_modes: unknown modes {unknown}; allowed values: {list(env.modes)}")
    validate_monitor(config, env)
    if config.monitor in JUDGES:  # the judge's checkpoint: a short name or a .gguf file is converted once
        from route.models.pretrained import resolve_model

        judge = config.monitor_judge_model or config.model_name_or_path
        check_model_path("monitor_judge_model", judge)
        config.monitor_judge_path = resolve_model(judge, flag="monitor_judge_model")
    env.check_ready()
    check_trl_options(config)
    config.target_args = resolve_target_args(config)
    return config.target_args


def probe_run(config: RoutedGRPOConfig) -> None:
    """The target's checks against the run's model architecture (`TargetBase.probe`), on an empty meta-device model
    built from the checkpoint's config.json (or the organism's architecture): `target_modules`, an svf subspace's
    shapes, sgtm sizes. Loads no weights and runs no forward. A model that is not a local directory (a Hub id) is
    checked when the trainer is constructed instead."""
    from route.targets import resolve_target_args, target_class

    model = empty_model(config.model_name_or_path)
    if model is not None:
        target_class(config.target).probe(model, resolve_target_args(config), config)


def empty_model(model_name_or_path: str | os.PathLike | None) -> Any:
    """The model's architecture on the meta device (no weights): from a local checkpoint's config.json (a short name
    or a .gguf file: its converted checkpoint, `route.models.pretrained`), or the organism's (None); None for anything
    else (a Hub id is not fetched for a check)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from route.models.pretrained import resolve_model

    path = resolve_model(model_name_or_path)  # a short name or a .gguf file: its converted checkpoint
    if path is not None and not os.path.isdir(path):
        return None
    with torch.device("meta"):
        if path is None:
            from route.models.organism import OrganismConfig, build_model, build_tokenizer

            return build_model(OrganismConfig(), build_tokenizer())
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def check_trl_options(config: RoutedGRPOConfig) -> None:
    """Refuse TRL options that cannot work with routing (ValueError naming the field and the allowed values).

    The KL reference (`beta > 0`) is the base model: the policy with every adapter disabled (dual_lora, svf: TRL's
    PEFT path) or a frozen copy of the model as loaded (sgtm: TRL's reference model). `sync_ref_model` would copy
    the trained policy, quarantine included, into the reference, so it is refused.
    """
    if config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(f"max_steps: must be >= 1 (or -1: train num_train_epochs epochs), got {config.max_steps}")
    if config.sync_ref_model:
        raise ValueError("sync_ref_model: allowed values: [False]; with routing the KL reference is the base model, "
                         "and syncing it would copy the quarantine into the reference")


__all__ = ["attach_target_args", "build_config", "check_trl_options", "config_fields", "config_parser", "empty_model",
           "flat_config", "parse_config", "probe_run", "validate_run"]
