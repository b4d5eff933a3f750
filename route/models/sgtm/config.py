"""`PretrainConfig`: every knob of `route sgtm`, read from a YAML file and flags (flags win).

SGTM pretraining (selective gradient masking; gradient routing, Cloud et al. 2024). Beyond the
seed: per-block `retain_mode`/`retain_fraction` and `retain_trains_forget` choose how blocks not
labeled forget train.

The label-noise knobs are the SGTM seed's: `tpr`/`fpr`, or `precision`/`recall`, or an
`undiscovered_rate` (the share of forget data labeled as ordinary data; tpr = 1 - rate, fpr = 0).
Exactly one of the three may be set. A bad value fails before any work, naming the field and the
allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from route.masks.strategies import available_strategies
from route.utils.threads import THREADS_DEFAULT

ARCHITECTURES = ("gpt_neo", "llama", "qwen2")
RETAIN_MODES = ("default", "retain")


@dataclass
class OptimFields:
    """Optimizer and logging knobs shared by the pretraining CLIs (SGTM and tiered)."""

    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (warm-up, then cosine down to a tenth)."})
    warmup_steps: int = field(default=50, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip."})
    eval_every: int = field(default=100, metadata={"help": "Steps between held-out evaluations (curves)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def check_positive(self, names: tuple[str, ...]) -> None:
        """A ValueError naming the first field of `names` that is below 1."""
        for name in names:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")


@dataclass
class PretrainConfig(OptimFields):
    """SGTM pretraining (see route/models/sgtm/pretrain.py)."""

    output_dir: str = field(default="runs/sgtm_default", metadata={"help": "Where results.json and the PNG go."})
    seed: int = field(default=0, metadata={"help": "Seed of data, labels, model init and batch sampling."})
    runs: list[str] = field(default_factory=lambda: ["sgtm", "filter"],
                            metadata={"help": "Runs to train: sgtm, filter (data-filtering baseline), none."})
    # data
    forget_data: str = field(default="procedural", metadata={"help": "'procedural', a Hub dataset or a local path."})
    retain_data: str = field(default="procedural", metadata={"help": "'procedural', a Hub dataset or a local path."})
    adjacent_data: str | None = field(
        default=None, metadata={"help": "Forget-adjacent data to keep: None, 'procedural', a Hub dataset or a path."})
    text_column: str = field(default="text", metadata={"help": "Text column of Hub / local datasets."})
    forget_text_column: str | None = field(
        default=None, metadata={"help": "Text column of forget_data (default: text_column); with retain_text_column "
                                        "one bilingual dataset can serve both."})
    retain_text_column: str | None = field(default=None, metadata={"help": "Text column of retain_data."})
    adjacent_text_column: str | None = field(default=None, metadata={"help": "Text column of adjacent_data."})
    data_split: str = field(default="train", metadata={"help": "Split of Hub datasets used for training."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split for held-out losses (None: hold out the last eval_blocks blocks)."})
    max_docs: int | None = field(default=None, metadata={"help": "Read at most this many documents per dataset."})
    tokenizer: str = field(default="char", metadata={"help": "'char' (built in-process) or a tokenizer name/path."})
    forget_share: float = field(default=0.25, metadata={"help": "Share of forget data in the training mix."})
    adjacent_share: float = field(default=0.15, metadata={"help": "Share of adjacent data (when adjacent_data)."})
    train_blocks: int = field(default=20000, metadata={"help": "Training blocks drawn (procedural data)."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks per kind."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per block."})
    # labels
    undiscovered_rate: float | None = field(
        default=None, metadata={"help": "Share of forget data labeled ordinary (tpr = 1 - rate, fpr = 0)."})
    tpr: float | None = field(default=None, metadata={"help": "P(labeled forget | forget data)."})
    fpr: float | None = field(default=None, metadata={"help": "P(labeled forget | other data), from adjacent data "
                                                              "when given."})
    precision: float | None = field(default=None, metadata={"help": "Labeler precision (with recall)."})
    recall: float | None = field(default=None, metadata={"help": "Labeler recall (with precision)."})
    upsample_forget: float = field(default=1.0, metadata={"help": "Sampling weight of forget-labeled blocks."})
    upsample_retain: float = field(default=1.0, metadata={"help": "Sampling weight of retain-labeled blocks."})
    upsample_adjacent: float = field(default=1.0, metadata={"help": "Sampling weight of adjacent-labeled blocks."})
    retain_mode: str = field(
        default="default", metadata={"help": "SGTM mode of blocks not labeled forget: default (every unit trains, "
                                             "as in SGTM) or retain (forward without the forget units).",
                                   "choices": list(RETAIN_MODES)})
    retain_fraction: float = field(
        default=1.0, metadata={"help": "With retain_mode=retain: share of the blocks not labeled forget that run in "
                                       "retain mode (drawn per block and step); the rest run in default mode."})
    retain_trains_forget: bool = field(
        default=True, metadata={"help": "Blocks not labeled forget also train the forget units; false: they use them "
                                        "in the forward but send them no gradient (forget units learn from "
                                        "forget-labeled blocks only)."})
    # model
    architecture: str = field(default="gpt_neo", metadata={"help": "Model family.", "choices": list(ARCHITECTURES)})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_layers: int = field(default=2, metadata={"help": "Transformer layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    num_kv_heads: int | None = field(default=None, metadata={"help": "KV heads (llama/qwen2; None: num_heads)."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    init_range: float = field(default=0.02, metadata={"help": "Initializer std."})
    retain_mlp_dim: int = field(default=192, metadata={"help": "Retain MLP units per masked layer (first units)."})
    retain_attn_heads: int = field(default=3, metadata={"help": "Retain heads per masked layer (first heads)."})
    masked_layers: list[int] | None = field(default=None, metadata={"help": "Masked layers (None: all)."})
    masking_strategy: str = field(default="parameter_masking", metadata={
        "help": "SGTM strategy (route.masks.strategies).", "choices": available_strategies()})
    split_masked_weights: bool = field(default=True, metadata={"help": "Retain/forget weights as separate "
                                                                       "parameters."})
    sgtm_mask_embeddings: bool = field(default=False, metadata={"help": "Forget rows do not train embeddings."})
    # optimization
    steps: int = field(default=1500, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(default=32, metadata={"help": "Blocks per step."})
    threads: int = field(default=0, metadata={"help": f"torch threads (0: {THREADS_DEFAULT})."})
    save_models: bool = field(default=False, metadata={"help": "Save the ablated SGTM model (vanilla format)."})

    def __post_init__(self):
        from route.masks import available_strategies

        if isinstance(self.runs, str):
            self.runs = [r.strip() for r in self.runs.split(",") if r.strip()]
        bad = [r for r in self.runs if r not in ("sgtm", "filter", "none")]
        if bad or not self.runs:
            raise ValueError(f"runs: invalid values {bad or self.runs}; allowed values: ['sgtm', 'filter', 'none']")
        for name, allowed in (("architecture", ARCHITECTURES), ("retain_mode", RETAIN_MODES),
                              ("masking_strategy", tuple(available_strategies()))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}; allowed values: {list(allowed)}")
        if self.adjacent_data in ("", "none", "None"):
            self.adjacent_data = None
        for name in ("forget_share", "adjacent_share", "undiscovered_rate", "tpr", "fpr", "precision", "recall",
                     "retain_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name}: must be a number in [0, 1], got {v!r}")
        adjacent = self.adjacent_share if self.adjacent_data else 0.0
        if self.forget_share + adjacent >= 1.0:
            raise ValueError("forget_share, adjacent_share: must leave a positive retain share")
        given = [g for g, keys in (("undiscovered_rate", ("undiscovered_rate",)), ("tpr/fpr", ("tpr", "fpr")),
                                   ("precision/recall", ("precision", "recall")))
                 if any(getattr(self, k) is not None for k in keys)]
        if len(given) > 1:
            raise ValueError(f"label noise: set one of undiscovered_rate, tpr/fpr, precision/recall; got {given}")
        if (self.precision is None) != (self.recall is None):
            raise ValueError("precision, recall: set both or neither")
        self.check_positive(("steps", "batch_size", "eval_every", "seq_len", "eval_blocks", "train_blocks"))
        for name in ("upsample_forget", "upsample_retain", "upsample_adjacent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")

    def label_rates(self, shares: dict[str, float]) -> tuple[float, float]:
        """(tpr, fpr) from whichever noise knob is set (default: perfect labels)."""
        from route.models.sgtm.data import tpr_fpr_from_precision_recall

        if self.undiscovered_rate is not None:
            return 1.0 - self.undiscovered_rate, 0.0
        if self.precision is not None:
            negative = shares.get("adjacent") or shares["retain"]
            return tpr_fpr_from_precision_recall(self.precision, self.recall, shares["forget"], negative)
        return (1.0 if self.tpr is None else self.tpr), (0.0 if self.fpr is None else self.fpr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_config(cls: type, argv: list[str] | None = None):
    """`--config FILE.yaml` plus `--field value` overrides for the config dataclass `cls` (flags win)."""
    from route.utils.io import parse_dataclass_config

    return parse_dataclass_config(cls, argv)


def parse_pretrain_config(argv: list[str] | None = None) -> PretrainConfig:
    """`--config FILE.yaml` plus `--field value` overrides (flags win over the file)."""
    return parse_config(PretrainConfig, argv)


__all__ = ["ARCHITECTURES", "OptimFields", "PretrainConfig", "RETAIN_MODES", "parse_config", "parse_pretrain_config"]
