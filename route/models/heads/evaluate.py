"""`route heads-evaluate`: the alpha dial of trained heads on held-out prompts (CSV and PNG).

    route heads-evaluate --run runs/heads_iav runs/heads_mav --output_dir runs/heads_sweep

For each head saved by `route.models.heads.train` in the given run directories (the constant-bias
baseline included), greedy-decodes the held-out prompts of the run's task at each alpha and
reports the preferred-property rate (the answer uses the format the prompt names) and task
accuracy (the digits are the sum). alpha = 0 is the base model. Writes `alpha_sweep.csv` and
`alpha_sweep.png`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch

from route.models.heads import task
from route.utils.errors import ArgumentParser, at_least, check_paths, cli
from route.utils.io import save_figure
from route.utils.threads import THREADS_DEFAULT, configure_threads


@torch.no_grad()
def rates(
    model,
    tokenizer,
    probs: list[task.Problem],
    alpha: float,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    progress: bool = False,
    sample: bool = True,
    seed: int = 0,
) -> dict:
    """Decoding at `alpha` (sampling at temperature 1 by default, else greedy): share of answers in the named
    format and share with the right sum. Samples are a pure function of (seed, batch index), whatever alpha."""
    from tqdm.auto import tqdm

    model.eval()
    follows = correct = 0
    tokenizer.padding_side = "left"
    for i in tqdm(range(0, len(probs), batch_size), desc=f"grade alpha={alpha:g}", disable=not progress):
        chunk = probs[i : i + batch_size]
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        gen = torch.Generator(device=model.device).manual_seed(seed * 100003 + i)
        out = model.generate(
            enc["input_ids"],
            enc["attention_mask"],
            alpha=alpha,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=gen,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for p, text in zip(chunk, texts):
            g = task.grade(p, text)
            follows += g["follows"]
            correct += g["correct"]
    n = max(1, len(probs))
    return {
        "alpha": alpha,
        "follow_rate": follows / n,
        "accuracy": correct / n,
        "n": len(probs),
        "decoding": "sample" if sample else "greedy",
    }


def sweep(
    runs: list[str],
    alphas: list[float],
    n: int | None = None,
    progress: bool = True,
    sample: bool = True,
    base: str | None = None,
) -> list[dict]:
    """One row per (run, head, alpha); `base` puts every head on that base instead of the run's (heads that
    cannot move there, e.g. IAV onto another width, are skipped with the reason)."""
    from transformers import AutoTokenizer

    from route.models.heads import AlignedCausalLM

    rows = []
    for run in runs:
        results = json.loads((Path(run) / "results.json").read_text())
        cfg = results["config"]
        held = task.problems(n or cfg["n_eval"], cfg["seed"], "eval", cfg["max_operand"])
        base_path = base or results["base_path"]
        tok = AutoTokenizer.from_pretrained(base_path)
        for kind, info in results["heads"].items():
            try:
                model = AlignedCausalLM.from_pretrained(info["path"], base=base_path)
            except ValueError as err:
                if base is None:
                    raise
                print(f"skipped {kind} of {run}: {err}")
                continue
            for alpha in alphas:
                r = rates(
                    model, tok, held, alpha, cfg["max_new_tokens"], progress=progress, sample=sample, seed=cfg["seed"]
                )
                rows.append({"run": Path(run).name, "head": kind, **r})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    seen = set()
    for key in dict.fromkeys((r["run"], r["head"]) for r in rows):
        if key[1] == "bias" and "bias" in seen:
            continue  # every run trains the same baseline: draw it once
        seen.add(key[1])
        pts = [r for r in rows if (r["run"], r["head"]) == key]
        label = "constant bias (baseline)" if key[1] == "bias" else key[1].upper()
        style = "--" if key[1] == "bias" else "-"
        for ax, metric in zip(axes, ("follow_rate", "accuracy")):
            ax.plot([p["alpha"] for p in pts], [p[metric] for p in pts], style, marker="o", label=label)
    for ax, title in zip(axes, ("answers in the named format", "sum correct (any format)")):
        ax.set_title(title)
        ax.set_xlabel("alpha (0 = base model)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


@cli("route heads-evaluate")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="route heads-evaluate", description="Sweep alpha over heads trained by route heads.")
    p.add_argument("--run", nargs="+", default=["runs/heads_iav"], help="run directories of route.models.heads.train")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5, 1.0, 1.5, 2.0], help="alpha values")
    p.add_argument("--n", type=int, default=None, help="held-out prompts (None: the run's n_eval)")
    p.add_argument("--output_dir", default=None, help="where the CSV and PNG go (None: the first run)")
    p.add_argument("--base", default=None, help="evaluate the heads on this base (same vocabulary; None: the run's)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (else sampling at temperature 1)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: {THREADS_DEFAULT})")
    args = p.parse_args(argv)
    missing = [r for r in args.run if not (Path(r) / "results.json").exists()]
    if missing:
        raise ValueError(f"--run: no results.json in {missing}; run route heads first")
    if args.n is not None:
        at_least("--n", args.n)
    if args.threads is not None:
        at_least("--threads", args.threads)
    if args.base is not None:
        from route.models.pretrained import resolve_model

        args.base = resolve_model(args.base, flag="--base")  # a short name: its converted checkpoint
        check_paths("--base", args.base, "directory")
    configure_threads(args.threads)
    rows = sweep(args.run, args.alphas, args.n, sample=not args.greedy, base=args.base)
    out = Path(args.output_dir or args.run[0])
    write_csv(rows, out / "alpha_sweep.csv")
    plot(rows, out / "alpha_sweep.png")
    print(f"{'run':<16}{'head':<6}{'alpha':>6}{'follows':>9}{'correct':>9}")
    for r in rows:
        print(f"{r['run']:<16}{r['head']:<6}{r['alpha']:>6g}{r['follow_rate']:>9.3f}{r['accuracy']:>9.3f}")
    print(f"wrote {out / 'alpha_sweep.csv'} and {out / 'alpha_sweep.png'}")


if __name__ == "__main__":
    main()
