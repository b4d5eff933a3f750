"""RoutedGRPOConfig: bad values fail before any work, naming the field; YAML + flags through the parser."""

import pytest

from route.trainer.config import RoutedGRPOConfig
from route.trainer.parse import build_config, parse_config

CPU = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize("field,value,message", [
    ("intervention", "erase", "intervention: invalid value 'erase'; allowed values: \\['none', 'filter', 'penalty'"),
    ("detector", "oracle", "detector: invalid value"),
    ("unflagged_mode", "forget", "unflagged_mode: invalid value"),
    ("generation_policy", "ablated", "generation_policy: invalid value"),
    ("target", "lora", "target: invalid value 'lora'; allowed values"),
    ("env", "chess", "env: invalid value 'chess'; allowed values"),
    ("detector_tpr", 1.5, "detector_tpr: must be a number in \\[0, 1\\]"),
    ("detector_fpr", -0.1, "detector_fpr"),
    ("retain_fraction", 2, "retain_fraction"),
    ("detector_modes", ["sentinel", "bogus"], "detector_modes: unknown modes \\['bogus'\\]"),
    ("keep_rank", 0, "keep_rank: must be >= 1"),
    ("eval_n", 0, "eval_n"),
    ("penalty", -1.0, "penalty: must be >= 0"),
    ("env_kwargs", "{not json", "env_kwargs: not valid JSON"),
    ("env_kwargs", {"hack_frac": 3}, "hack_frac must be in \\[0, 1\\]"),
    ("routing", "soft", "routing: invalid value 'soft'; allowed values: \\['classic', 'exclusive'\\]"),
    ("route_weight", -0.5, "route_weight: must be a finite number >= 0"),
    ("route_weight", "half", "route_weight: must be a finite number >= 0"),
    ("route_clamp", 0.0, "route_clamp: must be None or a finite number > 0"),
])
def test_bad_values_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_config(**CPU, **{field: value})


def test_route_clamp_needs_soft_routing():
    with pytest.raises(ValueError, match="^route_clamp: needs route_weight != 1"):
        build_config(**CPU, route_clamp=0.1)
    config = build_config(**CPU, route_clamp=0.1, route_weight=2.0)
    assert (config.routing, config.route_weight, config.route_clamp, config.split_moments) == ("classic", 2.0, 0.1,
                                                                                               False)


def test_defaults_are_valid_and_strings_are_parsed():
    c = RoutedGRPOConfig(**CPU, env_kwargs='{"hack_frac": 0.25}', detector_modes="sentinel,echo")
    assert c.env_kwargs == {"hack_frac": 0.25} and c.detector_modes == ["sentinel", "echo"]
    assert (c.intervention, c.target, c.unflagged_mode, c.generation_policy) == ("route", "dual_lora", "default",
                                                                                 "full")


def test_yaml_env_name_and_flag_overrides(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("env: arith\nenv_kwargs: {hack_frac: 0.3}\nintervention: filter\ndetector_tpr: 0.7\n"
                    "use_cpu: true\nbf16: false\nreport_to: none\noutput_dir: x\n")
    c = parse_config(["--config", str(yaml), "--intervention", "none", "--output_dir", "y"])
    assert (c.env, c.env_kwargs, c.intervention, c.detector_tpr, c.output_dir) == (
        "arith", {"hack_frac": 0.3}, "none", 0.7, "y")


def test_yaml_unknown_field_and_bad_value(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("use_cpu: true\nbf16: false\nreport_to: none\noutput_dir: x\nintervenshun: route\n")
    with pytest.raises(ValueError, match="unknown fields"):
        parse_config(["--config", str(yaml)])
    yaml.write_text("use_cpu: true\nbf16: false\nreport_to: none\noutput_dir: x\nintervention: erase\n")
    with pytest.raises(ValueError, match="intervention"):
        parse_config(["--config", str(yaml)])


def test_default_config_file_parses():
    from route.train_grpo import DEFAULT_CONFIG
    from route.train_grpo import parse_config as main_parse

    assert DEFAULT_CONFIG.exists()
    c = main_parse(["--max_steps", "7"])
    assert c.max_steps == 7 and c.intervention == "route" and c.detector == "noisy" and c.use_cpu
