"""SGTM pretraining: `route sgtm --config configs/sgtm_default.yaml [--field value ...]`.

SGTM (selective gradient masking) as in its seed, on gradient routing (Cloud et al. 2024).

Trains, on forget / retain / optional forget-adjacent data with noisy forget labels:

- `sgtm`: a model with reserved forget units; blocks labeled forget run in forget mode, the rest
  in `retain_mode` (`default` as in SGTM, or `retain`); evaluated before and after `ablate()`;
- `filter`: the data-filtering baseline, a vanilla model of the same size trained on the blocks
  not labeled forget (undiscovered forget data leaks in exactly as for SGTM);
- `none`: no filtering (optional reference).

It writes `results.json` (atomically) with forget / retain (/ adjacent) loss per run before and
after ablation, loss curves, and the trade-off comparison, plus `loss_curves.png`. Departures
from the seed's trainer: a batch mixes labels (per-row modes, one forward and backward), the
optimizer skips parameters that got no gradient (`route.masks.optim.SkipZeroAdamW`), and the default
data are procedural languages (`route.models.sgtm.data`) instead of bilingual TinyStories.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch

from route.masks.optim import build_optimizer
from route.models.sgtm.config import PretrainConfig, parse_pretrain_config
from route.models.sgtm.data import KINDS, char_tokenizer, load_texts, noisy_labels, pack, procedural_texts
from route.utils.errors import cli
from route.utils.io import save_figure, write_json_atomic
from route.utils.threads import configure_threads

RUNS = ("sgtm", "filter", "none")


# ---------------------------------------------------------------------------------------------- data
def _texts(cfg: PretrainConfig, kind: str, blocks: int, seed: int, split: str) -> list[str]:
    source = getattr(cfg, f"{kind}_data")
    if source == "procedural":
        return procedural_texts(kind, n=math.ceil(blocks * cfg.seq_len / 200) + 8, seed=seed)
    column = getattr(cfg, f"{kind}_text_column") or cfg.text_column
    return load_texts(source, column, split, limit=cfg.max_docs)


def build_data(cfg: PretrainConfig) -> dict:
    """Tokenizer, training blocks with their true kinds and noisy labels, and held-out blocks per kind."""
    kinds = [k for k in KINDS if getattr(cfg, f"{k}_data") not in (None, "", "none")]
    shares = {"forget": cfg.forget_share, "adjacent": cfg.adjacent_share if "adjacent" in kinds else 0.0}
    shares["retain"] = 1.0 - shares["forget"] - shares["adjacent"]
    n_train = {k: max(1, round(cfg.train_blocks * shares[k])) for k in kinds}
    train_texts = {k: _texts(cfg, k, n_train[k], cfg.seed, cfg.data_split) for k in kinds}
    eval_texts = {k: (_texts(cfg, k, cfg.eval_blocks, cfg.seed + 10_000, cfg.eval_split)
                      if getattr(cfg, f"{k}_data") == "procedural" or cfg.eval_split else None) for k in kinds}
    if cfg.tokenizer == "char":
        every = [t for d in (train_texts, eval_texts) for v in d.values() if v for t in v]
        tok = char_tokenizer(None if all(getattr(cfg, f"{k}_data") == "procedural" for k in kinds) else every)
    else:
        from transformers import AutoTokenizer

        from route.models.pretrained import resolve_model

        tok = AutoTokenizer.from_pretrained(resolve_model(cfg.tokenizer, flag="tokenizer"))
    train, held = {}, {}
    for k in kinds:
        blocks = pack(train_texts[k], tok, cfg.seq_len)
        if eval_texts[k] is None:  # hold out the last blocks of the training text
            if len(blocks) <= cfg.eval_blocks:
                raise ValueError(f"{k}_data: {len(blocks)} blocks cannot spare eval_blocks={cfg.eval_blocks}")
            blocks, held[k] = blocks[: -cfg.eval_blocks], blocks[-cfg.eval_blocks:]
        else:
            held[k] = pack(eval_texts[k], tok, cfg.seq_len)[: cfg.eval_blocks]
        train[k] = blocks[: n_train[k]] if getattr(cfg, f"{k}_data") == "procedural" else blocks
    tpr, fpr = cfg.label_rates(shares)
    block_kinds = [k for k in kinds for _ in range(len(train[k]))]
    labels = noisy_labels(block_kinds, tpr, fpr, cfg.seed)
    ups = {"forget": cfg.upsample_forget, "retain": cfg.upsample_retain, "adjacent": cfg.upsample_adjacent}
    weights = torch.tensor([shares[k] / len(train[k]) * ups[lab] for k, lab in zip(block_kinds, labels)])
    realised = {"tpr": _rate(block_kinds, labels, lambda k: k == "forget"),
                "fpr": _rate(block_kinds, labels, lambda k: k != "forget")}
    return {"tokenizer": tok, "blocks": torch.cat([train[k] for k in kinds]), "kinds": block_kinds,
            "labels": labels, "weights": weights, "eval": held, "shares": shares,
            "labeling": {"tpr": tpr, "fpr": fpr, "realised_tpr": realised["tpr"], "realised_fpr": realised["fpr"],
                         "false_positives_from": "adjacent" if "adjacent" in kinds else "retain"}}


def _rate(kinds: list[str], labels: list[str], which) -> float | None:
    flags = [lab == "forget" for k, lab in zip(kinds, labels) if which(k)]
    return sum(flags) / len(flags) if flags else None


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: PretrainConfig, vocab_size: int, sgtm: bool):
    """The run's model: SGTM (reserved units) or vanilla, same architecture and size, drawn from cfg.seed."""
    from transformers import GPTNeoConfig, LlamaConfig, Qwen2Config

    from route.models.sgtm import GPTNeoForCausalLMSGTM, LlamaForCausalLMSGTM, Qwen2ForCausalLMSGTM

    fields = dict(retain_mlp_dim=cfg.retain_mlp_dim, retain_attn_heads=cfg.retain_attn_heads,
                  masked_layers=cfg.masked_layers, masking_strategy=cfg.masking_strategy,
                  split_masked_weights=cfg.split_masked_weights, sgtm_mask_embeddings=cfg.sgtm_mask_embeddings)
    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.seq_len, initializer_range=cfg.init_range, bos_token_id=1,
                  eos_token_id=1, pad_token_id=0)
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "gpt_neo":
        config = GPTNeoConfig(num_layers=cfg.num_layers, num_heads=cfg.num_heads, attention_types=[[["global"],
                              cfg.num_layers]], embed_dropout=0.0, resid_dropout=0.0, attention_dropout=0.0, **common)
        config.lm_head_bias = False  # vanilla GPT-Neo's head, so the deployed model exports to the vanilla class
        cls = GPTNeoForCausalLMSGTM
    else:
        config = (LlamaConfig if cfg.architecture == "llama" else Qwen2Config)(
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, tie_word_embeddings=True, **common)
        cls = LlamaForCausalLMSGTM if cfg.architecture == "llama" else Qwen2ForCausalLMSGTM
    if not sgtm:  # vanilla: every unit retain (the SGTM classes then equal the plain model)
        fields.update(retain_mlp_dim=None, retain_attn_heads=None, sgtm_mask_embeddings=False)
    for k, v in fields.items():
        setattr(config, k, v)
    return cls(config)


def check_sizes(cfg: PretrainConfig) -> None:
    """Build every run's model on the meta device (no weights, global RNG untouched): size errors (heads, units,
    layers) are raised before the data is built or any run trains."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        for name in cfg.runs:
            build_model(cfg, vocab_size=64, sgtm=name == "sgtm")


@torch.no_grad()
def evaluate(model, held: dict[str, torch.Tensor], batch_size: int, ablated: bool = False) -> dict[str, float]:
    """Mean next-token loss per kind (the deployed forward if `ablated`)."""
    model.eval()
    out = {}
    for kind, blocks in held.items():
        total, count = 0.0, 0
        for i in range(0, len(blocks), batch_size):
            x = blocks[i: i + batch_size]
            mode = {"sgtm_mode": "retain"} if ablated else {}
            loss = model(input_ids=x, labels=x, **mode).loss
            total, count = total + loss.item() * len(x), count + len(x)
        out[kind] = total / count
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- training
def train_run(name: str, cfg: PretrainConfig, data: dict, progress: bool = True) -> dict:
    """One run (sgtm, filter or none): curves of held-out losses and the final losses."""
    from tqdm.auto import tqdm

    sgtm = name == "sgtm"
    model = build_model(cfg, len(data["tokenizer"]), sgtm=sgtm)
    model.train()
    forget_label = torch.tensor([lab == "forget" for lab in data["labels"]])
    weights = data["weights"].clone()
    if name == "filter":
        weights[forget_label] = 0.0
    groups = model.sgtm_masks.param_groups(mixed="shared")
    opt = build_optimizer(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    curve, start = [], time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=name, disable=not progress, file=sys.stderr)
    for step in bar:
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=gen)
        x = data["blocks"][idx]
        modes, gate = None, contextlib.nullcontext()
        if sgtm:
            as_retain = torch.rand(cfg.batch_size, generator=gen) < (cfg.retain_fraction if cfg.retain_mode == "retain"
                                                                     else 0.0)
            flagged = forget_label[idx]
            modes = ["forget" if f else "retain" if r else "default" for f, r in zip(flagged.tolist(),
                                                                                     as_retain.tolist())]
            gate = model.sgtm_masks.gate(modes, frozen_forget=None if cfg.retain_trains_forget else ~flagged)
        with gate:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        if sgtm:
            model.adjust_gradients(sgtm_mode=modes)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            point = {"step": step, "train_loss": out.loss.item(), **evaluate(model, data["eval"], cfg.batch_size)}
            if sgtm:
                point.update({f"{k}_ablated": v for k, v in evaluate(model, data["eval"], cfg.batch_size,
                                                                      ablated=True).items()})
            curve.append(point)
            bar.set_postfix({k: f"{v:.3f}" for k, v in point.items() if k in ("forget", "retain")})
    result = {"curve": curve, "train_seconds": round(time.perf_counter() - start, 1),
              "n_params": sum(p.numel() for p in model.parameters())}
    result["before_ablation"] = evaluate(model, data["eval"], cfg.batch_size)
    if sgtm:
        deployed = copy.deepcopy(model)
        deployed.ablate()
        result["after_ablation"] = evaluate(deployed, data["eval"], cfg.batch_size)
        if cfg.save_models:
            deployed.to_vanilla().save_pretrained(Path(cfg.output_dir) / "sgtm_deployed")
    else:
        result["after_ablation"] = dict(result["before_ablation"])  # nothing to ablate
    return result


def interp_on_curve(curve: list[dict], retain: float, key_r: str, key_f: str) -> float | None:
    """Forget loss on a run's (retain, forget) checkpoint path at a given retain loss (None outside the path)."""
    pts = [(p[key_r], p[key_f]) for p in curve]
    for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
        lo, hi = min(r0, r1), max(r0, r1)
        if lo <= retain <= hi and hi > lo:
            return f0 + (f1 - f0) * (retain - r0) / (r1 - r0)
    return None


def summarize(results: dict) -> dict:
    """The headline numbers: SGTM's rise from ablation and its trade-off against filtering."""
    out = {}
    s = results.get("sgtm")
    if s:
        b, a = s["before_ablation"], s["after_ablation"]
        out["sgtm_forget_rise"] = a["forget"] / b["forget"] - 1
        out["sgtm_retain_rise"] = a["retain"] / b["retain"] - 1
    f = results.get("filter")
    if s and f:
        r_s, f_s = s["after_ablation"]["retain"], s["after_ablation"]["forget"]
        matched = interp_on_curve(f["curve"], r_s, "retain", "forget")
        out["filter_forget_at_sgtm_retain"] = matched
        out["forget_gain_at_matched_retain"] = None if matched is None else f_s - matched
        out["endpoints"] = {"sgtm_ablated": {"retain": r_s, "forget": f_s},
                            "filter": {"retain": f["after_ablation"]["retain"],
                                       "forget": f["after_ablation"]["forget"]}}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results.items():
        steps = [p["step"] for p in run["curve"]]
        for kind, style in (("forget", "-"), ("retain", "--")):
            ax1.plot(steps, [p[kind] for p in run["curve"]], style, label=f"{name} {kind}")
            if name == "sgtm":
                ax1.plot(steps, [p[f"{kind}_ablated"] for p in run["curve"]], style, label=f"sgtm ablated {kind}")
        rk, fk = ("retain_ablated", "forget_ablated") if name == "sgtm" else ("retain", "forget")
        ax2.plot([p[rk] for p in run["curve"]], [p[fk] for p in run["curve"]], "o-", ms=3,
                 label=f"{name}{' (ablated)' if name == 'sgtm' else ''}")
    ax1.set(xlabel="step", ylabel="held-out loss (nats/token)", title="loss curves")
    ax2.set(xlabel="retain loss", ylabel="forget loss", title="forget/retain trade-off (checkpoints)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Every run in `cfg.runs`; writes results.json and loss_curves.png to `cfg.output_dir`."""
    configure_threads(cfg.threads or None)
    out_dir = Path(cfg.output_dir)
    check_sizes(cfg)
    data = build_data(cfg)
    results = {name: train_run(name, cfg, data, progress) for name in cfg.runs}
    report = {"config": cfg.to_dict(), "data": {"shares": data["shares"], "train_blocks": len(data["blocks"]),
                                                "eval_blocks": {k: len(v) for k, v in data["eval"].items()},
                                                "labeling": data["labeling"]},
              "runs": results, "summary": summarize(results)}
    write_json_atomic(out_dir / "results.json", report)
    plot(results, out_dir / "loss_curves.png")
    return report


def format_report(report: dict) -> str:
    lines = ["| run | forget before | forget after | retain before | retain after |", "|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        b, a = r["before_ablation"], r["after_ablation"]
        lines.append(f"| {name} | {b['forget']:.3f} | {a['forget']:.3f} | {b['retain']:.3f} | {a['retain']:.3f} |")
    return "\n".join(lines) + "\n" + str({k: v for k, v in report["summary"].items() if k != "endpoints"})


@cli("route sgtm")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_pretrain_config(argv)
    report = run(cfg, progress=cfg.progress)
    print(format_report(report))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
