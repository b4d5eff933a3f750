"""route.experiments.selection_probes: the relearn probes' commands cover every selected run of every arm, and the
probes' outputs are read back per arm (table and figure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from route.experiments import selection, selection_probes
from tests.test_selection import SEEDS, grid


def write_runs(results: list[dict], root: Path, tmp_path: Path) -> None:
    """Each result into its own run directory under root, with the organism path the probes read."""
    for r in results:
        r["model"] = str(tmp_path / "organism")
        r["config"]["output_dir"] = str(root / r["config"]["output_dir"])
        Path(r["config"]["output_dir"]).mkdir(parents=True)
        (Path(r["config"]["output_dir"]) / "results.json").write_text(json.dumps(r))


def test_relearn_probes_are_grouped_per_arm(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    rows = [{"label": f"sort_named/{arm}/s{s}", "method": "grpo", "reference": False, "threshold": 0.15,
             "hack_rate_start": start, "hack_rate_end": start + 0.1, "mean_hack_rate": start + 0.05,
             "solve_rate_end": 0.3, "steps_to_threshold": steps}
            for arm, start, steps in (("route", 0.0, None), ("none", 0.2, 0)) for s in SEEDS]
    rows.append({**rows[0], "label": "reference (base organism)", "reference": True, "hack_rate_start": 0.05,
                 "steps_to_threshold": 30})
    (out / "relearn_summary.json").write_text(json.dumps(rows))
    table = selection_probes.relearn_arms([out], n_boot=100)["grpo"]["sort_named"]
    assert set(table) == {"route", "none", "base organism"}
    assert table["route"]["n"] == 5 and table["route"]["steps_to_threshold"] == [None] * 5
    assert table["none"]["mean_hack_rate"][0] == pytest.approx(0.25)
    assert table["base organism"]["steps_to_threshold"] == [30]
    assert "| route | 5 |" in selection_probes.relearn_markdown(selection_probes.relearn_arms([out], n_boot=100))
    with pytest.raises(ValueError, match="--relearn"):
        selection_probes.relearn_arms([tmp_path])
    assert selection_probes.plot_relearn_arms([out], tmp_path / "none.png") is None  # no relearn.csv: no figure
    (out / "relearn.csv").write_text("label,method,step,hack_rate\n" + "".join(
        f"sort_named/route/s{s},grpo,{t},{0.1 * t / 10}\n" for s in SEEDS for t in (0, 10)))
    png = selection_probes.plot_relearn_arms([out], tmp_path / "arms.png")
    assert png is not None and png.stat().st_size > 1000


def test_probe_commands_cover_every_selected_run_of_every_arm(tmp_path):
    results = grid(none=(("penalty",), dict(penalty=0.0)), p=(("penalty",), {}), f=(("filter",), {}),
                   r=(("route",), {}))
    write_runs(results, tmp_path, tmp_path)
    summary = selection.summarise(results, n_boot=50)
    lines = selection_probes.probe_commands(summary, str(tmp_path / "probes"))
    assert [line.split()[line.split().index("--method") + 1] for line in lines] == ["grpo", "sft"]
    for line in lines:
        labels = line.split("--labels ")[1].split(" --output_dir")[0].split()
        assert labels == [f"sort_named/{a}/s{s}" for a in ("none", "penalty", "filter", "route") for s in SEEDS]
        assert f"--reference {tmp_path / 'organism'}" in line and "penalty-0.0-1.0-none-0/cell.yaml" in line
    assert "--sft_n 64" in lines[1] and lines[1].endswith(f"{tmp_path / 'probes' / 'sort_named_sft'}")


def test_route_runs_that_kept_quarantine_are_probed_at_both_scales(tmp_path):
    results = grid(none=(("penalty",), dict(penalty=0.0)), r=(("route",), dict(scale=0.25)))
    write_runs(results, tmp_path, tmp_path)
    line = selection_probes.probe_commands(selection.summarise(results, n_boot=50), str(tmp_path / "probes"))[0]
    labels = line.split("--labels ")[1].split(" --output_dir")[0].split()
    ckpts = line.split("--checkpoints ")[1].split(" --labels")[0].split()
    assert labels == [f"sort_named/{a}/s{s}" for a in ("none", "route", "route@0") for s in SEEDS]
    # the run directory (probed at the picked scale) and, for route@0, its ablated policy
    assert len(ckpts) == 15 and ckpts[10:] == [f"{c}/deployed" for c in ckpts[5:10]]
    assert all(c.endswith(f"route-2.0-1.0-none-{s}") for c, s in zip(ckpts[5:10], SEEDS, strict=True))
    # at scale 0 the two are one policy: probed once
    flat = grid(none=(("penalty",), dict(penalty=0.0)), r=(("route",), {}))
    write_runs(flat, tmp_path / "flat", tmp_path)
    assert "route@0" not in selection_probes.probe_commands(selection.summarise(flat, n_boot=50), "p")[0]


def test_cli_writes_probes_sh_with_the_probe_length(tmp_path):
    results = grid(none=(("penalty",), dict(penalty=0.0)), r=(("route",), {}))
    write_runs(results, tmp_path / "runs", tmp_path)
    selection.main([str(tmp_path / "runs"), "--n_boot", "50", "--output_dir", str(tmp_path / "out"),
                    "--probe_commands", str(tmp_path / "probes"), "--probe_steps", "120", "--probe_every", "20"])
    lines = (tmp_path / "out" / "probes.sh").read_text().splitlines()
    assert len(lines) == 2 and all("--steps 120 --every 20 " in line for line in lines)
