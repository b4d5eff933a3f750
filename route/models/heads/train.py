"""`route heads`: preference-train an IAV or MAV head (and the constant-bias baseline) through TRL.

    route heads --config configs/iav_default.yaml
    route heads --config configs/mav_default.yaml --steps 100

The embedded default needs nothing downloaded: a tiny Llama base is built and warm-started on the
format task of `route.models.heads.task` (cached under the route cache), then each head is trained with
`HeadDPOTrainer` on (prompt, chosen, rejected) pairs and graded on held-out prompts at alpha 0
(the base) and at `eval_alpha`. A base passed as `base:` (name or path) is used as is; its
tokenizer must write the task's characters. Writes `<output_dir>/<kind>/` (each saved head) and
`<output_dir>/results.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from route.models.heads import HEAD_KINDS, build_head, task
from route.models.heads.evaluate import rates
from route.models.heads.mav import LAYER_CHOICES
from route.utils.errors import cli
from route.utils.kernels import portable
from route.utils.threads import THREADS_DEFAULT, configure_threads

HEADS = ("iav", "mav")


@dataclass
class HeadsTrainConfig:
    """Every knob of `route heads` (YAML file plus flags; flags win)."""

    output_dir: str = field(default="runs/heads_iav", metadata={"help": "Where the heads and results.json go."})
    head: str = field(default="iav", metadata={"help": "Head to train.", "choices": list(HEADS)})
    baseline: bool = field(default=True, metadata={"help": "Also train the constant-bias head the same way."})
    seed: int = field(default=0, metadata={"help": "Seed of task draws, base init, head init and batch order."})
    base: str = field(default="", metadata={"help": "Base model name or path; empty: the embedded tiny base."})
    # task
    n_train: int = field(default=2000, metadata={"help": "Preference pairs (prompt, chosen, rejected)."})
    n_eval: int = field(default=512, metadata={"help": "Held-out prompts graded after training."})
    max_operand: int = field(default=9, metadata={"help": "Operands of the sums are drawn from 0..max_operand."})
    follow_share: float = field(default=0.5, metadata={"help": "Base demos follow the named format this often."})
    # embedded base
    base_hidden_size: int = field(default=64, metadata={"help": "Embedded base: hidden size."})
    base_layers: int = field(default=3, metadata={"help": "Embedded base: decoder layers."})
    base_steps: int = field(default=800, metadata={"help": "Embedded base: warm-start steps."})
    base_batch_size: int = field(default=32, metadata={"help": "Embedded base: warm-start batch size."})
    base_lr: float = field(default=3e-3, metadata={"help": "Embedded base: warm-start learning rate."})
    # head
    train_base_head: bool = field(default=False, metadata={"help": "IAV: also train the base's own head."})
    layers: str = field(default="auto", metadata={"help": "MAV: auto, uniform or comma-separated layer indices."})
    num_layers: int = field(default=4, metadata={"help": "MAV: layers read with layers=uniform."})
    fusion_width: int = field(default=64, metadata={"help": "MAV: width each layer is pooled to."})
    mlp_width: int = field(default=0, metadata={"help": "MAV: fusion MLP width (0: fusion_width)."})
    dropout: float = field(default=0.1, metadata={"help": "MAV: dropout in the fusion MLP."})
    # preference training
    steps: int = field(default=300, metadata={"help": "Optimizer steps per head."})
    batch_size: int = field(default=16, metadata={"help": "Preference pairs per step."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Head learning rate (AdamW, cosine)."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    dpo_weight: float = field(default=1.0, metadata={"help": "Weight of the DPO loss (reference: the base)."})
    margin_weight: float = field(default=0.0, metadata={"help": "Weight of the reference-free margin loss."})
    margin_beta: float = field(default=2.0, metadata={"help": "Scale of the reference-free margin."})
    margin_gamma: float = field(default=0.0, metadata={"help": "Target margin of the reference-free loss."})
    kl_weight: float = field(default=0.05, metadata={"help": "Weight of KL(policy || base) on completion tokens."})
    l2_weight: float = field(default=0.0, metadata={"help": "Weight of the mean squared alignment vector."})
    alpha_train: float = field(default=1.0, metadata={"help": "alpha used in the training forward."})
    # evaluation
    eval_alpha: float = field(default=1.0, metadata={"help": "alpha at which the trained heads are graded."})
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens generated per held-out prompt."})
    eval_sample: bool = field(default=True, metadata={"help": "Grade sampled answers (temperature 1); false: greedy."})
    threads: int = field(default=0, metadata={"help": f"torch CPU threads (0: {THREADS_DEFAULT})."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head: invalid value {self.head!r}; allowed values: {list(HEADS)}")
        if isinstance(self.layers, list):
            self.layers = ",".join(str(i) for i in self.layers)
        if self.layers not in LAYER_CHOICES:
            try:
                [int(i) for i in str(self.layers).split(",")]
            except ValueError:
                raise ValueError(
                    f"layers: invalid value {self.layers!r}; allowed values: {list(LAYER_CHOICES)} "
                    "or comma-separated layer indices"
                ) from None
        for name in (
            "n_train",
            "n_eval",
            "steps",
            "batch_size",
            "base_steps",
            "base_batch_size",
            "max_new_tokens",
            "base_hidden_size",
            "base_layers",
            "fusion_width",
            "max_operand",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.follow_share <= 1.0:
            raise ValueError(f"follow_share: must be in [0, 1], got {self.follow_share}")
        self.loss_weights()  # validates the loss weights

    def loss_weights(self):
        from route.models.heads.trainer import LossWeights

        return LossWeights(
            self.dpo_weight,
            self.margin_weight,
            self.margin_beta,
            self.margin_gamma,
            self.kl_weight,
            self.l2_weight,
            self.alpha_train,
        )

    def head_settings(self, kind: str) -> dict:
        if kind == "iav":
            return {"train_base_head": self.train_base_head}
        if kind == "mav":
            layers = self.layers if self.layers in LAYER_CHOICES else [int(i) for i in self.layers.split(",")]
            return {
                "layers": layers,
                "num_layers": self.num_layers,
                "fusion_width": self.fusion_width,
                "mlp_width": self.mlp_width or None,
                "dropout": self.dropout,
            }
        return {}


def embedded_base(cfg: HeadsTrainConfig, progress: bool = True) -> Path:
    """The cached embedded base (tiny Llama warm-started on the format task), built on first use."""
    from route.models.organism import OrganismConfig, build_model, build_tokenizer, cache_root, sft
    from route.utils.io import atomic_dir

    keys = (
        "seed",
        "max_operand",
        "follow_share",
        "base_hidden_size",
        "base_layers",
        "base_steps",
        "base_batch_size",
        "base_lr",
    )
    spec = {"task_version": task.VERSION, **{k: getattr(cfg, k) for k in keys}}
    path = cache_root() / "heads_base" / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    if (path / "heads_base.json").exists():
        return path
    tok = build_tokenizer()
    ocfg = OrganismConfig(
        hidden_size=cfg.base_hidden_size,
        num_layers=cfg.base_layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=2 * cfg.base_hidden_size,
        seed=cfg.seed,
    )
    model = build_model(ocfg, tok)
    demos = task.demonstrations(task.problems(8000, cfg.seed, "base", cfg.max_operand), cfg.follow_share, cfg.seed)
    sft(
        model,
        tok,
        demos,
        cfg.base_steps,
        cfg.base_batch_size,
        cfg.base_lr,
        warmup_steps=20,
        seed=cfg.seed,
        progress=progress,
        desc="base warm start",
    )
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "heads_base.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path


def make_trainer(model, tokenizer, cfg: HeadsTrainConfig, work_dir: Path):
    """A `HeadDPOTrainer` for `model` on the task's preference pairs, configured from `cfg`."""
    from datasets import Dataset
    from trl import DPOConfig

    from route.models.heads.trainer import HeadDPOTrainer

    probs = task.problems(cfg.n_train, cfg.seed, "train", cfg.max_operand)
    data = Dataset.from_dict(task.preference_rows(probs, cfg.seed))
    args = DPOConfig(
        output_dir=str(work_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, cfg.steps // 10),
        beta=cfg.beta,
        logging_steps=max(1, cfg.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_dropout=False,
        max_length=64,
        gradient_checkpointing=False,
        optim="adamw_torch_fused" if portable() else "adamw_torch",  # route.utils.kernels.adamw_kwargs
        seed=cfg.seed,
        disable_tqdm=not cfg.progress,
    )
    return HeadDPOTrainer(model, args=args, weights=cfg.loss_weights(), train_dataset=data, processing_class=tokenizer)


def train_head(kind: str, base_path: str, cfg: HeadsTrainConfig, out_dir: Path) -> dict:
    """Train one head of `kind` on a fresh copy of the base; save it to `out_dir`; return its training log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    torch.manual_seed(cfg.seed)
    model = build_head(kind, base, **cfg.head_settings(kind))
    work_dir = out_dir.parent / f".trainer_{kind}"
    trainer = make_trainer(model, tok, cfg, work_dir)
    start = time.time()
    trainer.train()
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # TRL's output_dir: nothing is saved there (save_strategy "no")
    model.eval()
    model.save_pretrained(out_dir, base_name_or_path=base_path)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "train_seconds": time.time() - start,
        "extra_parameters": model.extra_parameters(),
        "final_log": logs[-1] if logs else {},
        "model": model,
        "tokenizer": tok,
    }


def run(cfg: HeadsTrainConfig) -> dict:
    from route.utils.io import write_json_atomic

    out = Path(cfg.output_dir)
    from route.models.pretrained import resolve_model

    base_path = resolve_model(cfg.base, flag="base") or str(embedded_base(cfg, progress=cfg.progress))
    held = task.problems(cfg.n_eval, cfg.seed, "eval", cfg.max_operand)
    results = {"config": dataclasses.asdict(cfg), "base_path": base_path, "heads": {}}
    for kind in [cfg.head] + (["bias"] if cfg.baseline else []):
        trained = train_head(kind, base_path, cfg, out / kind)
        model, tok = trained.pop("model"), trained.pop("tokenizer")
        if "base" not in results:
            results["base"] = rates(
                model, tok, held, 0.0, cfg.max_new_tokens, progress=cfg.progress, sample=cfg.eval_sample, seed=cfg.seed
            )
        trained["eval"] = rates(
            model,
            tok,
            held,
            cfg.eval_alpha,
            cfg.max_new_tokens,
            progress=cfg.progress,
            sample=cfg.eval_sample,
            seed=cfg.seed,
        )
        trained["path"] = str(out / kind)
        results["heads"][kind] = trained
    write_json_atomic(out / "results.json", results)
    return results


def format_results(results: dict) -> str:
    alpha = results["config"]["eval_alpha"]
    lines = [f"{'policy':<16}{'follows format':>16}{'sum correct':>14}{'extra params':>14}"]
    b = results["base"]
    lines.append(f"{'base (alpha 0)':<16}{b['follow_rate']:>16.3f}{b['accuracy']:>14.3f}{0:>14}")
    for kind, r in results["heads"].items():
        e = r["eval"]
        lines.append(
            f"{f'{kind} (alpha {alpha:g})':<16}{e['follow_rate']:>16.3f}{e['accuracy']:>14.3f}"
            f"{r['extra_parameters']:>14}"
        )
    return "\n".join(lines)


def parse_config(argv: list[str] | None = None) -> HeadsTrainConfig:
    """`--config FILE.yaml` plus `--field value` overrides (flags win over the file)."""
    from route.utils.io import parse_dataclass_config

    return parse_dataclass_config(HeadsTrainConfig, argv)


@cli("route heads")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    configure_threads(cfg.threads or None)
    results = run(cfg)
    print(format_results(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")


__all__ = ["HEAD_KINDS", "HeadsTrainConfig", "embedded_base", "make_trainer", "parse_config", "run", "train_head"]


if __name__ == "__main__":
    main()
