"""Every YAML file in configs/ parses with the command that reads it (nothing runs): main-job configs through the main
job's parser and its checks, sweep specs into their cells (each cell's config parsed too), the heads', SGTM's and
tiered pretraining's configs through their own parsers, accelerate configs as mappings. Configs written for a GPU
say so on their first line, and parse here with bf16 off."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
GPU_ONLY = "# NOT YET RUN ON A GPU."


def kind(path: Path) -> str:
    values = yaml.safe_load(path.read_text()) or {}
    if "compute_environment" in values:
        return "accelerate"
    if "grid" in values or "base" in values:
        return "sweep"
    for prefix in ("iav_", "mav_", "sgtm_", "tiered_"):
        if path.name.startswith(prefix):
            return prefix.rstrip("_")
    return "main"


def test_every_config_is_covered():
    kinds = [kind(p) for p in FILES]
    assert len(FILES) >= 38 and {"accelerate", "sweep", "iav", "mav", "sgtm", "tiered", "main"} <= set(kinds)


def parse_main(path: Path, *flags: str):
    from route.train_grpo import parse_config

    values = yaml.safe_load(path.read_text())
    gpu = bool(values.get("bf16"))
    if gpu:
        assert path.read_text().startswith(GPU_ONLY), f"{path.name}: a bf16 config must be marked as not run"
    return parse_config(["--config", str(path), *flags, *(["--bf16", "false"] if gpu else [])])


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_config_parses(path, tmp_path, monkeypatch, real_model_packages):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing a parser might write lands in the repository
    what = kind(path)
    if what == "accelerate":
        values = yaml.safe_load(path.read_text())
        assert values["num_processes"] >= 1 and values["distributed_type"] in ("NO", "DEEPSPEED")
    elif what == "sweep":
        from route.experiments.sweep import expand, load_spec
        from route.experiments.sweep_spec import dump_yaml
        from route.trainer.parse import parse_config

        cells = expand(load_spec(path), tmp_path / "out")
        assert cells
        first = tmp_path / "cell.yaml"
        first.write_text(dump_yaml(cells[0].values))
        gpu = bool(cells[0].values.get("bf16"))
        if gpu:
            assert path.read_text().startswith(GPU_ONLY), f"{path.name}: a sweep of a bf16 config must be marked"
        parse_config(["--config", str(first), *(["--bf16", "false"] if gpu else [])])
    elif what in ("iav", "mav"):
        from route.models.heads.train import parse_config

        assert parse_config(["--config", str(path)]).head == what
    elif what == "sgtm":
        from route.models.sgtm.pretrain import parse_pretrain_config

        parse_pretrain_config(["--config", str(path)])
    elif what == "tiered":
        from route.models.tiered.pretrain import parse_tiered_config

        parse_tiered_config(["--config", str(path)])
    else:
        if "smollm2" in path.read_text() and not real_model_packages:
            pytest.skip("the real model's packages are not installed (docs/pretrained.md)")
        subspace = yaml.safe_load(path.read_text()).get("svf_hack_subspace")
        if subspace:  # written by `route vhack` before the run; an empty one of the right format here
            import torch

            (tmp_path / subspace).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"format": "route.vhack/1", "subspace": {}}, tmp_path / subspace)
        config = parse_main(path)
        if config.use_vllm:
            from route.trainer.config import check_vllm_config

            check_vllm_config(config)


GPU_CONFIGS = {"gpu_smollm2_vllm.yaml": "smollm2-135m-instruct", "gpu_qwen05b_vllm.yaml": "Qwen/Qwen2.5-0.5B-Instruct",
               "gpu_qwen15b_vllm.yaml": "Qwen/Qwen2.5-1.5B-Instruct", "real_gpu.yaml": "Qwen/Qwen2.5-0.5B-Instruct"}


@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_gpu_configs_are_one_gpu_bf16_checkpointed_vllm_runs(name, real_model_packages):
    path = CONFIGS / name
    values = yaml.safe_load(path.read_text())
    assert path.read_text().startswith(GPU_ONLY)
    assert values["model_name_or_path"] == GPU_CONFIGS[name]
    assert values["bf16"] is True and values["gradient_checkpointing"] is True and values["use_cpu"] is False
    assert values["use_vllm"] is True and values["vllm_mode"] == "colocate" and values["env_kwargs"]["chat"] is True
    assert values["generation_policy"] == "deployed" and values["vllm_importance_sampling_correction"] is True


@pytest.fixture
def real_model_packages() -> bool:
    from route.models.pretrained import MODELS, packaged_file

    try:
        packaged_file("model_name_or_path", MODELS["smollm2-135m-instruct"])
    except ValueError:
        return False
    return True
