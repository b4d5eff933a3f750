"""SGTM pretraining: config parsing, label noise, procedural and local data, tiny end-to-end runs."""

import json
from pathlib import Path

import pytest

from route.models.sgtm.config import PretrainConfig, parse_pretrain_config
from route.models.sgtm.data import noisy_labels, procedural_texts, tpr_fpr_from_precision_recall
from route.models.sgtm.pretrain import build_data, main, run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, retain_mlp_dim=24, retain_attn_heads=1,
            seq_len=32, batch_size=4, steps=4, eval_every=2, train_blocks=80, eval_blocks=4, warmup_steps=1,
            progress=False, threads=1)


def test_shipped_configs_parse():
    paths = sorted(CONFIGS.glob("sgtm_*.yaml"))
    assert paths
    for path in paths:
        cfg = parse_pretrain_config(["--config", str(path), "--steps", "7"])
        assert cfg.steps == 7 and "sgtm" in cfg.runs


@pytest.mark.parametrize("kwargs,match", [
    (dict(runs=["sgtm", "erase"]), "runs.*allowed values"),
    (dict(architecture="gpt2"), "architecture.*allowed values"),
    (dict(retain_mode="forget"), "retain_mode.*allowed values"),
    (dict(masking_strategy="erase"), "masking_strategy.*allowed values"),
    (dict(undiscovered_rate=0.1, tpr=0.9), "one of"),
    (dict(precision=0.9), "precision, recall"),
    (dict(forget_share=1.2), "forget_share"),
])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**kwargs)


def test_label_noise_knobs():
    kinds = ["forget"] * 4000 + ["retain"] * 4000
    labels = noisy_labels(kinds, tpr=0.7, fpr=0.1, seed=0)
    assert labels == noisy_labels(kinds, tpr=0.7, fpr=0.1, seed=0), "a pure function of the seed"
    assert 0.67 < labels[:4000].count("forget") / 4000 < 0.73
    assert 0.08 < labels[4000:].count("forget") / 4000 < 0.12
    with_adjacent = noisy_labels(["retain"] * 2000 + ["adjacent"] * 2000, tpr=1.0, fpr=0.5, seed=1)
    assert with_adjacent[:2000].count("forget") == 0, "false positives come from the adjacent data"
    assert 0.45 < with_adjacent[2000:].count("forget") / 2000 < 0.55
    tpr, fpr = tpr_fpr_from_precision_recall(precision=0.8, recall=0.5, positive=0.25, negative=0.75)
    assert tpr == 0.5 and abs(0.5 * 0.25 / (0.5 * 0.25 + fpr * 0.75) - 0.8) < 1e-9
    assert PretrainConfig(undiscovered_rate=0.3).label_rates({"forget": 0.25, "retain": 0.75}) == (0.7, 0.0)


def test_procedural_languages_are_deterministic_and_distinct():
    a, b = procedural_texts("forget", 3, seed=0), procedural_texts("forget", 3, seed=0)
    assert a == b and procedural_texts("forget", 3, seed=1) != a
    r = " ".join(procedural_texts("retain", 20, seed=0))
    f = " ".join(procedural_texts("forget", 20, seed=0))
    assert set(r.split()).isdisjoint(set(f.split())), "the two languages share no word"


def test_tiny_run_writes_results_and_plot(tmp_path):
    cfg = PretrainConfig(output_dir=str(tmp_path / "out"), runs=["sgtm", "filter", "none"],
                         adjacent_data="procedural", undiscovered_rate=0.2, **TINY)
    report = run(cfg, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["undiscovered_rate"] == 0.2 and (tmp_path / "out" / "loss_curves.png").stat().st_size > 0
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [], "atomic writes only"
    for name in ("sgtm", "filter", "none"):
        r = saved["runs"][name]
        for when in ("before_ablation", "after_ablation"):
            assert set(r[when]) == {"forget", "retain", "adjacent"}
        assert [p["step"] for p in r["curve"]] == [2, 4]
    assert "forget_ablated" in saved["runs"]["sgtm"]["curve"][0]
    assert saved["runs"]["filter"]["before_ablation"] == saved["runs"]["filter"]["after_ablation"]
    lab = saved["data"]["labeling"]
    assert lab["tpr"] == 0.8 and lab["fpr"] == 0.0 and lab["false_positives_from"] == "adjacent"
    assert {"sgtm_forget_rise", "sgtm_retain_rise", "forget_gain_at_matched_retain"} <= set(report["summary"])


def test_local_datasets_load_by_path_and_llama_runs(tmp_path):
    import datasets

    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps({"text": t}) for t in procedural_texts("forget", 40, seed=3)))
    datasets.Dataset.from_dict({"text": procedural_texts("retain", 60, seed=3)}).save_to_disk(str(tmp_path / "ret"))
    cfg = PretrainConfig(output_dir=str(tmp_path / "out"), forget_data=str(forget), retain_data=str(tmp_path / "ret"),
                         architecture="llama", runs=["sgtm"], **TINY)
    data = build_data(cfg)
    assert set(data["eval"]) == {"forget", "retain"} and len(data["eval"]["forget"]) == 4
    report = run(cfg, progress=False)
    assert report["runs"]["sgtm"]["after_ablation"]["forget"] > 0
    with pytest.raises(ValueError, match="text_column"):
        build_data(PretrainConfig(forget_data=str(forget), text_column="body", **TINY))


def test_cli_reads_the_config_and_flags(tmp_path, capsys):
    main(["--config", str(CONFIGS / "sgtm_default.yaml"), "--output_dir", str(tmp_path / "cli"), "--runs", "sgtm",
          *[a for k, v in TINY.items() for a in (f"--{k}", str(v))]])
    out = capsys.readouterr().out
    assert "| sgtm |" in out and (tmp_path / "cli" / "results.json").exists()


def test_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_pretrain_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--undiscovered_rate" in out and "--retain_fraction" in out and "--masking_strategy" in out
