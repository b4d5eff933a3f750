"""Probes of a trained tiered run (Tiered Alignment): extraction by fine-tuning and partial-key leaks.

    route tiered-probes extract --run_dir runs/tiered_default --output_dir runs/tiered_probes
    route tiered-probes leak --run_dir runs/tiered_default --output_dir runs/tiered_probes

Both read a `route tiered` output directory (`results.json`, `key.json`, `models/`)
and rebuild its held-out data from the run's config.

- `extract`: fine-tune on `n` keyed-language blocks (full parameters, AdamW at a constant `--lr`) and
  measure held-out keyed (and public) loss every `--every` steps, step 0 included, for each arm:
  `tiered_public` (the released weights in the public configuration: an attacker without the key),
  `public_only` (a model that never saw keyed data), `fresh` (a random init of the same architecture)
  and `tiered_keyed` (the keyed configuration, which holds the capability). Steps-to-threshold: the
  first measured step whose keyed loss is <= `--threshold` (default: the keyed configuration's loss
  times 1 + `--threshold_margin`). The seed's claim is resistance to extraction: the public
  configuration should need about as many steps as a model that never saw the keyed data.
- `leak`: apply a random `k` share of the key's swaps (`--draws` draws per share) and report how much
  of the keyed capability returns: recovered = (L_public - L_k) / (L_public - L_keyed) on keyed data.

Writes `extract.csv` / `extract_summary.csv` / `extract.png` and `leak.csv` / `leak_summary.csv` /
`leak.png` (atomically), in the style of `route relearn`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from route.models.tiered.config import TieredConfig
from route.models.tiered.data import build_data, sample
from route.models.tiered.key import PermutationKey, load_key
from route.models.tiered.permute import apply_key
from route.models.tiered.pretrain import build_model, evaluate
from route.models.tiered.train import lm_loss
from route.utils.errors import ArgumentParser, check_paths, cli
from route.utils.io import save_figure
from route.utils.kernels import adamw_kwargs
from route.utils.threads import THREADS_DEFAULT, configure_threads


def load_run(run_dir: str | Path) -> dict:
    """The run's config, data, key and trained models (`tiered`, `public_only` when present)."""
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    for need in ("results.json", "key.json", "models/tiered"):
        if not (run_dir / need).exists():
            raise ValueError(
                f"run_dir: {run_dir} has no {need}; run route tiered with save_models: true first"
            )
    cfg = TieredConfig(**json.loads((run_dir / "results.json").read_text())["config"])
    data = build_data(cfg.train_blocks, cfg.eval_blocks, cfg.seq_len, cfg.seed)
    models = {
        name: AutoModelForCausalLM.from_pretrained(run_dir / "models" / name)
        for name in ("tiered", "public_only")
        if (run_dir / "models" / name).exists()
    }
    return {"cfg": cfg, "data": data, "key": load_key(run_dir / "key.json"), "models": models}


ARMS = ("tiered_public", "public_only", "fresh", "tiered_keyed")


def arm_model(run: dict, arm: str) -> torch.nn.Module:
    """A fresh copy of one extraction arm's starting model."""
    if arm == "tiered_public":
        return copy.deepcopy(run["models"]["tiered"])
    if arm == "tiered_keyed":
        return apply_key(copy.deepcopy(run["models"]["tiered"]), run["key"])
    if arm == "public_only":
        return copy.deepcopy(run["models"]["public_only"])
    if arm == "fresh":
        torch.manual_seed(run["cfg"].seed + 7)
        return build_model(run["cfg"], len(run["data"]["tokenizer"]))
    raise ValueError(f"arm: invalid value {arm!r}; allowed values: {list(ARMS)}")


def finetune_curve(
    model: torch.nn.Module,
    train: torch.Tensor,
    held: dict,
    steps: int,
    every: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[dict]:
    """Held-out losses at step 0 and every `every` steps of fine-tuning on `train` (AdamW, constant lr)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **adamw_kwargs())
    gen = torch.Generator().manual_seed(seed)
    rows = [{"step": 0, **evaluate(model, held, batch_size)}]
    model.train()
    for step in range(1, steps + 1):
        lm_loss(model, sample(train, min(batch_size, len(train)), gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            rows.append({"step": step, **evaluate(model, held, batch_size)})
    return rows


def run_extract(args: argparse.Namespace) -> list[dict]:
    from tqdm.auto import tqdm

    from route.models.evaluate import steps_to_threshold
    from route.utils.io import write_csv

    run = load_run(args.run_dir)
    cfg, held = run["cfg"], run["data"]["eval"]
    keyed_ref = evaluate(run["models"]["tiered"], held, cfg.batch_size, run["key"])["keyed"]
    threshold = args.threshold if args.threshold is not None else keyed_ref * (1 + args.threshold_margin)
    rows, summary = [], []
    arms = [a for a in ARMS if a != "public_only" or "public_only" in run["models"]]
    cells = [(n, arm) for n in args.n for arm in arms]
    for n, arm in tqdm(cells, desc="extract", disable=not args.progress, file=sys.stderr):
        model = arm_model(run, arm)
        train = run["data"]["train"]["keyed"][:n]
        curve = finetune_curve(model, train, held, args.steps, args.every, args.lr, cfg.batch_size, args.seed)
        rows += [{"arm": arm, "n": n, **r} for r in curve]
        steps = [r["step"] for r in curve]
        summary.append(
            {
                "arm": arm,
                "n": n,
                "threshold": round(threshold, 4),
                "steps_to_threshold": steps_to_threshold(steps, [-r["keyed"] for r in curve], -threshold),
                "keyed_loss_start": curve[0]["keyed"],
                "keyed_loss_end": curve[-1]["keyed"],
                "public_loss_start": curve[0]["public"],
                "public_loss_end": curve[-1]["public"],
            }
        )
    out = Path(args.output_dir)
    write_csv(out / "extract.csv", rows)
    write_csv(out / "extract_summary.csv", summary)
    plot_extract(rows, threshold, out / "extract.png")
    return summary


def plot_extract(rows: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = [r for r in rows if r["arm"] == arm and r["n"] == n]
            ax.plot([r["step"] for r in pts], [r["keyed"] for r in pts], marker="o", markersize=3, label=arm)
        ax.axhline(threshold, color="0.5", linestyle=":", label=f"threshold {threshold:.3f}")
        ax.set(title=f"fine-tuning on {n} keyed blocks", xlabel="step", ylabel="held-out keyed loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_leak(args: argparse.Namespace) -> list[dict]:
    from route.utils.io import write_csv

    run = load_run(args.run_dir)
    cfg, held, key, model = run["cfg"], run["data"]["eval"], run["key"], run["models"]["tiered"]
    public = evaluate(model, held, cfg.batch_size)
    keyed = evaluate(model, held, cfg.batch_size, key)
    gap = public["keyed"] - keyed["keyed"]
    rows = []
    for fraction in args.fractions:
        for draw in range(args.draws if 0 < fraction < 1 else 1):
            part: PermutationKey = key.subset(fraction, seed=args.seed + draw)
            losses = evaluate(model, held, cfg.batch_size, part)
            rows.append(
                {
                    "fraction": fraction,
                    "draw": draw,
                    "swaps": len(part),
                    "keyed_loss": losses["keyed"],
                    "public_loss": losses["public"],
                    "recovered": (public["keyed"] - losses["keyed"]) / gap if gap else float("nan"),
                }
            )
    summary = [
        {
            "fraction": f,
            "recovered_mean": statistics.fmean(r["recovered"] for r in rows if r["fraction"] == f),
            "recovered_min": min(r["recovered"] for r in rows if r["fraction"] == f),
            "recovered_max": max(r["recovered"] for r in rows if r["fraction"] == f),
            "keyed_loss_mean": statistics.fmean(r["keyed_loss"] for r in rows if r["fraction"] == f),
            "public_loss_mean": statistics.fmean(r["public_loss"] for r in rows if r["fraction"] == f),
        }
        for f in args.fractions
    ]
    out = Path(args.output_dir)
    write_csv(out / "leak.csv", rows)
    write_csv(out / "leak_summary.csv", summary)
    plot_leak(summary, out / "leak.png")
    return summary


def plot_leak(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [100 * s["fraction"] for s in summary]
    a.plot(x, [s["recovered_mean"] for s in summary], marker="o")
    a.fill_between(x, [s["recovered_min"] for s in summary], [s["recovered_max"] for s in summary], alpha=0.2)
    a.set(title="keyed capability recovered", xlabel="% of the key's swaps applied", ylabel="recovered share")
    b.plot(x, [s["keyed_loss_mean"] for s in summary], marker="o", label="keyed data")
    b.plot(x, [s["public_loss_mean"] for s in summary], marker="s", label="public data")
    b.set(title="held-out loss", xlabel="% of the key's swaps applied", ylabel="loss (nats/char)")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@cli("route tiered-probes")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="route tiered-probes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    for name, text in (
        ("extract", "steps-to-threshold when fine-tuning on keyed data"),
        ("leak", "capability returned by a partial key"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("--run_dir", default="runs/tiered_default", help="A route.models.tiered.pretrain output_dir.")
        q.add_argument("--output_dir", default="runs/tiered_probes", help="Where the CSV and PNG go.")
        q.add_argument("--seed", type=int, default=0, help="Seed of batch order (extract) or swap draws (leak).")
        q.add_argument("--threads", type=int, default=None, help=f"torch threads (None: {THREADS_DEFAULT}).")
        if name == "extract":
            q.add_argument(
                "--n", type=int, nargs="+", default=[32, 256], help="Keyed training blocks (one probe per value)."
            )
            q.add_argument("--steps", type=int, default=150, help="Fine-tuning steps.")
            q.add_argument("--every", type=int, default=10, help="Steps between evaluations.")
            q.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant).")
            q.add_argument(
                "--threshold",
                type=float,
                default=None,
                help="Keyed loss to reach (default: the keyed configuration's x (1 + margin)).",
            )
            q.add_argument("--threshold_margin", type=float, default=0.05, help="Margin of the default threshold.")
            q.add_argument(
                "--progress",
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=True,
                help="Show a progress bar.",
            )
        else:
            q.add_argument(
                "--fractions",
                type=float,
                nargs="+",
                default=[0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
                help="Shares of the key's swaps to apply.",
            )
            q.add_argument("--draws", type=int, default=3, help="Random subsets per share (strictly between 0, 1).")
    args = p.parse_args(argv)
    for name in ("steps", "every", "draws"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if any(not 0 <= f <= 1 for f in getattr(args, "fractions", [])):
        raise ValueError(f"--fractions: each must be in [0, 1], got {args.fractions}")
    if any(n < 1 for n in getattr(args, "n", [])):
        raise ValueError(f"--n: each must be >= 1, got {args.n}")
    check_paths("--run_dir", args.run_dir, "directory")
    configure_threads(args.threads)
    summary = run_extract(args) if args.probe == "extract" else run_leak(args)
    for row in summary:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"-> {args.output_dir}/{args.probe}.csv, {args.probe}_summary.csv, {args.probe}.png")


if __name__ == "__main__":
    main()
