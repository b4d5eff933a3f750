"""`TieredConfig`: every knob of `route tiered`, from a YAML file and flags (flags win).

Tiered Alignment's two-pass pretraining on data made in-process (see `route.models.tiered.data`). A bad value
fails before any work, naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from route.models.sgtm.config import OptimFields
from route.models.tiered.key import HEAD_FIELDS, MLP_FIELDS
from route.utils.threads import THREADS_DEFAULT

RUNS = ("tiered", "all_data", "public_only")
ARCHITECTURES = ("gpt_neo", "llama", "qwen2")
KEYED_PASS_PUBLIC = ("fresh", "same")


@dataclass
class TieredConfig(OptimFields):
    """Two-pass tiered pretraining and its two baselines (see route/models/tiered/pretrain.py)."""

    output_dir: str = field(default="runs/tiered_default", metadata={"help": "Where results, models and PNG go."})
    seed: int = field(default=0, metadata={"help": "Seed of data, model init, key and batch sampling."})
    runs: list[str] = field(
        default_factory=lambda: list(RUNS),
        metadata={"help": "Runs: tiered (two-pass), all_data (one model on all data), public_only (public data only)."},
    )
    # key
    key_path: str | None = field(default=None, metadata={"help": "A key JSON (the seed's format); None: draw one."})
    head_share: float = field(default=0.25, metadata={"help": "Share of heads in a drawn key."})
    mlp_share: float = field(default=0.25, metadata={"help": "Share of MLP columns in a drawn key."})
    head_field: str = field(
        default="attn_heads",
        metadata={
            "help": "Key field of a drawn key's head swaps: attn_heads (whole heads) or attn_out_heads (only "
            "their output-projection columns).",
            "choices": list(HEAD_FIELDS),
        },
    )
    mlp_field: str = field(
        default="mlp_cols",
        metadata={
            "help": "Key field of a drawn key's MLP swaps: mlp_cols (whole columns), mlp_up_cols (input "
            "projection only) or mlp_down_cols (output projection only).",
            "choices": list(MLP_FIELDS),
        },
    )
    layout: str = field(
        default="public",
        metadata={
            "help": "Layout of the optimizer step: public or keyed (the seed's; same weights for a fixed key).",
            "choices": ["public", "keyed"],
        },
    )
    public_scale: float = field(
        default=0.5, metadata={"help": "Public gradients' scale after both passes (the seed's mean: 0.5)."}
    )
    keyed_data_public_scale: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the keyed-language blocks' gradient on the public parameters in the keyed pass: "
            "1 the seed (they train every parameter), 0 the keyed parameters only (public ones never see keyed "
            "data), in between a share."
        },
    )
    keyed_data_trains_public: bool | None = field(
        default=None,
        metadata={"help": "Deprecated, kept for old configs: true is keyed_data_public_scale 1, false is 0."},
    )
    # data
    keyed_mix: float = field(
        default=0.5,
        metadata={
            "help": "Share of keyed-language blocks in the keyed pass's batch (the rest is public data); "
            "times batch_size must be a whole number of blocks."
        },
    )
    keyed_pass_public: str = field(
        default="fresh",
        metadata={
            "help": "Public blocks of the keyed pass: fresh (batch_size x (1 - keyed_mix) blocks drawn anew) or "
            "same (the public pass's batch_size blocks, as in the seed, where both passes see one batch).",
            "choices": list(KEYED_PASS_PUBLIC),
        },
    )
    train_blocks: int = field(default=6000, metadata={"help": "Training blocks per language."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks per language."})
    seq_len: int = field(default=64, metadata={"help": "Characters per block."})
    # model
    architecture: str = field(
        default="gpt_neo", metadata={"help": "Model family (the SGTM classes).", "choices": list(ARCHITECTURES)}
    )
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    init_range: float = field(default=0.02, metadata={"help": "Initializer std."})
    # optimization
    steps: int = field(default=300, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(
        default=16, metadata={"help": "Blocks per pass (baselines: both passes' blocks as one batch)."}
    )
    threads: int = field(default=0, metadata={"help": f"torch threads (0: {THREADS_DEFAULT})."})
    save_models: bool = field(default=True, metadata={"help": "Save the models (for the probes) and the key."})

    def __post_init__(self):
        if self.keyed_data_trains_public is not None:  # the old switch: mapped onto the share, then dropped
            self.keyed_data_public_scale = 1.0 if self.keyed_data_trains_public else 0.0
            self.keyed_data_trains_public = None
        if isinstance(self.runs, str):
            self.runs = [r.strip() for r in self.runs.split(",") if r.strip()]
        bad = [r for r in self.runs if r not in RUNS]
        if bad or not self.runs:
            raise ValueError(f"runs: invalid values {bad or self.runs}; allowed values: {list(RUNS)}")
        for name, allowed in (
            ("architecture", ARCHITECTURES),
            ("layout", ("public", "keyed")),
            ("head_field", HEAD_FIELDS),
            ("mlp_field", MLP_FIELDS),
            ("keyed_pass_public", KEYED_PASS_PUBLIC),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}; allowed values: {list(allowed)}")
        for name in ("head_share", "mlp_share", "keyed_mix", "public_scale", "keyed_data_public_scale"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name}: must be a number in [0, 1], got {getattr(self, name)!r}")
        self.check_positive(
            ("steps", "batch_size", "eval_every", "seq_len", "eval_blocks", "train_blocks", "num_layers")
        )
        blocks = self.keyed_mix * self.batch_size
        if abs(blocks - round(blocks)) > 1e-9:
            raise ValueError(
                f"keyed_mix: {self.keyed_mix} x batch_size {self.batch_size} = {blocks:g} keyed blocks per keyed pass; "
                f"must be a whole number (multiples of 1/{self.batch_size})"
            )
        if self.num_layers < 2:
            raise ValueError("num_layers: a key swaps across layers; need at least 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_tiered_config(argv: list[str] | None = None) -> TieredConfig:
    """`--config FILE.yaml` plus `--field value` overrides (flags win over the file)."""
    from route.models.sgtm.config import parse_config

    return parse_config(TieredConfig, argv)


__all__ = ["ARCHITECTURES", "RUNS", "TieredConfig", "parse_tiered_config"]
