"""Two-pass pretraining end to end on a tiny config (outputs, margins, saved models) and the two probes on its
output; bad config values name the field."""

import csv
import dataclasses
import json

import pytest
from transformers import AutoModelForCausalLM

from route.models.tiered import load_key, model_layout, random_key
from route.models.tiered.config import TieredConfig, parse_tiered_config
from route.models.tiered.data import build_data
from route.models.tiered.pretrain import MARGINS, evaluate, main, margins, run
from route.models.tiered.probes import main as probes_main

TINY = dict(
    steps=4,
    eval_every=2,
    train_blocks=40,
    eval_blocks=4,
    seq_len=32,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    batch_size=4,
    warmup_steps=1,
    progress=False,
    head_share=0.5,  # 2 of 4 heads and 32 of 64 columns per layer: 2 head swaps and 32 column swaps
    mlp_share=0.5,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiered")
    run(TieredConfig(output_dir=str(out), **TINY))
    return out


def test_outputs_margins_and_saved_models(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["runs"]) == {"tiered", "all_data", "public_only"}
    assert set(results["runs"]["tiered"]) >= {"public_config", "keyed_config", "curve"}
    assert [p["step"] for p in results["runs"]["tiered"]["curve"]] == [2, 4]
    assert set(results["margins"]["pass"]) >= {
        "keyed_vs_all_data",
        "leak_vs_public_only",
        "public_config_vs_public_only",
        "keyed_config_vs_public_only",
    }
    assert results["margins"] == margins(results["runs"]), "the written margins are those of the written losses"
    c2, ref_all = results["runs"]["tiered"]["keyed_config"], results["runs"]["all_data"]["public_config"]
    assert results["margins"]["relative"]["keyed_vs_all_data"] == round(c2["keyed"] / ref_all["keyed"] - 1, 4)
    assert "| tiered | keyed |" in (run_dir / "results.md").read_text()
    assert (run_dir / "loss_curves.png").stat().st_size > 1000
    key = load_key(run_dir / "key.json")
    assert key.to_dict() == results["key"] and len(key.attn_heads) == 2 and len(key.mlp_cols) == 32
    cfg = TieredConfig(**results["config"])
    held = build_data(cfg.train_blocks, cfg.eval_blocks, cfg.seq_len, cfg.seed)["eval"]
    tiered = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "tiered")
    for config, k in (("public_config", None), ("keyed_config", key)):  # saved in the public layout
        got = evaluate(tiered, held, cfg.batch_size, k)
        for kind, loss in results["runs"]["tiered"][config].items():
            assert got[kind] == pytest.approx(loss, rel=1e-5), (config, kind)
    assert not any(p.name.startswith(".") for p in run_dir.iterdir()), "no temporary files left behind"


def runs_with(c1=(2.0, 4.0), c2=(2.0, 2.0), all_data=(2.0, 2.0), public_only=(2.0, 4.0), curve=()):
    """A `runs` mapping as pretraining writes it, from (public, keyed) held-out losses."""

    def losses(pair):
        return {"public": pair[0], "keyed": pair[1]}

    return {
        "tiered": {"public_config": losses(c1), "keyed_config": losses(c2), "curve": []},
        "all_data": {"public_config": losses(all_data), "curve": []},
        "public_only": {"public_config": losses(public_only),
                        "curve": [{"step": s, **losses(p)} for s, p in curve]},
    }


def test_margins_values_and_direction_on_constructed_losses():
    """Each margin is a relative loss difference (the formulas of docs/tiered.md); a lower loss is better, so the keyed
    configuration passes while its keyed loss stays within 10% of the all-data model's, the public configuration while
    its keyed loss stays at least the public-only model's (minus 5%: no leak) and both configurations while their public
    loss stays within 5% of the public-only model's."""
    m = margins(runs_with())
    assert m["thresholds"] == MARGINS
    assert m["relative"] == {
        "keyed_vs_all_data": 0.0,
        "leak_vs_public_only": 0.0,
        "public_config_vs_public_only": 0.0,
        "keyed_config_vs_public_only": 0.0,
    }
    assert all(m["pass"].values()) and len(m["pass"]) == 4
    cases = [  # (the run changed, its (public, keyed) losses) -> the one margin that moves, its value, holds?
        (dict(c2=(2.0, 2.18)), "keyed_vs_all_data", 0.09, True),
        (dict(c2=(2.0, 2.22)), "keyed_vs_all_data", 0.11, False),  # worse keyed loss in the keyed configuration
        (dict(all_data=(2.0, 2.5), c2=(2.0, 2.0)), "keyed_vs_all_data", -0.2, True),  # better than all data: fine
        (dict(c1=(2.0, 3.84)), "leak_vs_public_only", -0.04, True),
        (dict(c1=(2.0, 3.76)), "leak_vs_public_only", -0.06, False),  # the public configuration learned keyed data
        (dict(c1=(2.0, 5.0)), "leak_vs_public_only", 0.25, True),  # worse on keyed data than public-only: no leak
        (dict(c1=(2.08, 4.0)), "public_config_vs_public_only", 0.04, True),
        (dict(c1=(2.12, 4.0)), "public_config_vs_public_only", 0.06, False),
        (dict(c2=(2.12, 2.0)), "keyed_config_vs_public_only", 0.06, False),
        (dict(c2=(1.8, 2.0)), "keyed_config_vs_public_only", -0.1, True),
    ]
    for change, name, value, holds in cases:
        m = margins(runs_with(**change))
        assert m["relative"][name] == pytest.approx(value, abs=1e-12), (change, name)
        assert m["pass"][name] is holds, (change, name)
        others = {k: v for k, v in m["pass"].items() if k != name}
        assert all(others.values()) and len(others) == 3, (change, others)
    assert len(cases) == 10
    assert margins({k: v for k, v in runs_with().items() if k != "all_data"}) == {}, "needs all three runs"


def test_the_matched_leak_margin_interpolates_the_public_only_curve():
    """The public-only model's keyed loss at the public loss the public configuration reached, linearly interpolated
    between its checkpoints (its final point included); absent outside the curve."""
    curve = [(1, (3.0, 5.0)), (2, (2.5, 4.5))]  # then the final point (2.0, 4.0)
    m = margins(runs_with(c1=(2.25, 4.0), curve=curve))  # halfway between (2.5, 4.5) and (2.0, 4.0): keyed 4.25
    assert m["relative"]["leak_vs_public_only_at_matched_public_loss"] == round(4.0 / 4.25 - 1, 4)
    assert m["pass"]["leak_vs_public_only_at_matched_public_loss"] is False  # 4.0 is 5.9% below 4.25
    m = margins(runs_with(c1=(2.75, 4.9), curve=curve))  # between (3.0, 5.0) and (2.5, 4.5): keyed 4.75
    assert m["relative"]["leak_vs_public_only_at_matched_public_loss"] == round(4.9 / 4.75 - 1, 4)
    assert m["pass"]["leak_vs_public_only_at_matched_public_loss"] is True
    m = margins(runs_with(c1=(1.9, 4.0), curve=curve))  # below every checkpoint's public loss
    assert "leak_vs_public_only_at_matched_public_loss" not in m["relative"] | m["pass"]


def test_probes_write_csv_and_png(run_dir, tmp_path):
    probes_main(
        [
            "extract",
            "--run_dir",
            str(run_dir),
            "--output_dir",
            str(tmp_path),
            "--n",
            "4",
            "--steps",
            "2",
            "--every",
            "1",
            "--progress",
            "false",
        ]
    )
    rows = list(csv.DictReader(open(tmp_path / "extract.csv")))
    assert {r["arm"] for r in rows} == {"tiered_public", "public_only", "fresh", "tiered_keyed"}
    assert [r["step"] for r in rows if r["arm"] == "fresh"] == ["0", "1", "2"]
    summary = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "extract_summary.csv"))}
    assert summary["tiered_keyed"]["steps_to_threshold"] == "0", "the keyed configuration starts at the threshold"
    probes_main(
        [
            "leak",
            "--run_dir",
            str(run_dir),
            "--output_dir",
            str(tmp_path),
            "--fractions",
            "0",
            "0.5",
            "1",
            "--draws",
            "2",
        ]
    )
    leak = list(csv.DictReader(open(tmp_path / "leak.csv")))
    assert [(r["fraction"], r["draw"]) for r in leak] == [("0.0", "0"), ("0.5", "0"), ("0.5", "1"), ("1.0", "0")]
    by = {r["fraction"]: r for r in leak}
    assert float(by["0.0"]["recovered"]) == 0.0 and float(by["1.0"]["recovered"]) == pytest.approx(1.0)
    assert int(by["0.5"]["swaps"]) == 17  # half of the key's 34 swaps
    for png in ("extract.png", "leak.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("runs", ["tiered", "filter"], "runs: invalid values.*allowed values"),
        ("layout", "C2", "layout: invalid value.*allowed values"),
        ("mlp_share", 1.5, "mlp_share"),
        ("architecture", "gpt2", "architecture: invalid value"),
        ("num_layers", 1, "num_layers"),
        ("head_field", "attn_out", r"head_field: invalid value 'attn_out'; allowed values: \['attn_heads', 'attn_out"),
        ("mlp_field", "mlp_heads", r"mlp_field: invalid value 'mlp_heads'; allowed values: \['mlp_cols', 'mlp_up"),
        ("keyed_mix", 0.4, r"keyed_mix: 0.4 x batch_size 16 = 6.4 .*whole number"),  # would run as 0.375
    ],
)
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TieredConfig(**{field: value})


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{f.name}" in text for f in dataclasses.fields(TieredConfig))


@pytest.mark.parametrize("keyed_pass_public", ["fresh", "same"])
def test_the_baselines_see_exactly_the_tiered_runs_blocks(monkeypatch, keyed_pass_public):
    """Per step, all_data trains on every block the tiered run's two passes saw (each once) and public_only on the
    same blocks without the keyed ones; with `same` the keyed pass's public rows are the public pass's blocks."""
    import torch

    import route.models.tiered.pretrain as pretrain

    seen: dict[str, list] = {"tiered": [], "all_data": [], "public_only": []}
    name = {"run": None}
    real_loss, real_step = pretrain.lm_loss, pretrain.two_pass_step

    def step(model, key, opt, first, second, **kw):
        seen["tiered"].append((first.clone(), second.clone()))
        return real_step(model, key, opt, first, second, **kw)

    def loss(model, batch):
        seen[name["run"]].append(batch.clone())
        return real_loss(model, batch)

    monkeypatch.setattr(pretrain, "two_pass_step", step)
    monkeypatch.setattr(pretrain, "lm_loss", loss)
    cfg = TieredConfig(**{**TINY, "steps": 2, "eval_every": 2, "keyed_pass_public": keyed_pass_public})
    data = build_data(cfg.train_blocks, cfg.eval_blocks, cfg.seq_len, cfg.seed)
    layout = model_layout(pretrain.build_model(cfg, len(data["tokenizer"])))
    key = random_key(layout.num_layers, layout.kv_heads, layout.mlp_dim, cfg.head_share, cfg.mlp_share, cfg.seed)
    for run_name in ("tiered", "all_data", "public_only"):
        name["run"] = run_name
        pretrain.train_run(run_name, cfg, data, key)
    n_keyed = round(cfg.batch_size * cfg.keyed_mix)
    assert len(seen["tiered"]) == len(seen["all_data"]) == len(seen["public_only"]) == cfg.steps
    for (first, second), every, public in zip(seen["tiered"], seen["all_data"], seen["public_only"], strict=True):
        if keyed_pass_public == "same":
            assert torch.equal(second[n_keyed:], first) and len(second) == cfg.batch_size + n_keyed
            blocks, public_blocks = second, first
        else:
            assert len(second) == cfg.batch_size and not torch.equal(second[n_keyed:], first[: len(second) - n_keyed])
            blocks, public_blocks = torch.cat([first, second]), torch.cat([first, second[n_keyed:]])
        assert torch.equal(every, blocks) and torch.equal(public, public_blocks)


@pytest.mark.parametrize("old,share", [(True, 1.0), (False, 0.0)])
def test_probes_read_runs_written_before_the_public_share_replaced_the_switch(run_dir, tmp_path, old, share):
    import shutil

    from route.models.tiered.probes import load_run

    copy = tmp_path / "old_run"
    shutil.copytree(run_dir, copy)
    results = json.loads((copy / "results.json").read_text())
    del results["config"]["keyed_data_public_scale"]
    results["config"]["keyed_data_trains_public"] = old
    (copy / "results.json").write_text(json.dumps(results))
    assert load_run(copy)["cfg"].keyed_data_public_scale == share
    flag = parse_tiered_config(["--keyed_data_trains_public", str(old).lower()])  # the old flag still works
    assert flag.keyed_data_public_scale == share and flag.keyed_data_trains_public is None
