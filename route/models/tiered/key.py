"""Permutation keys (Tiered Alignment): the seed's JSON format, validation against a model, random keys.

A key is a set of swaps of attention heads and MLP columns between layers. The JSON is the seed's,
read and written as is:

    {"attn_heads": [[[1, 0], [5, 3]]], "mlp_cols": [[[2, 10], [7, 42]]]}

Each swap is `[[layer_a, idx_a], [layer_b, idx_b]]`. Fields (a missing one means no swaps):

- `attn_heads`: whole heads (q/k/v rows with their biases, the attention output projection's columns);
- `mlp_cols`: whole MLP columns (the input projection rows with their biases, the output projection's column);
- `attn_out_heads`: only a head's columns of the attention output projection;
- `mlp_up_cols`: only a column's input projection rows (c_fc, or gate and up) with their biases;
- `mlp_down_cols`: only a column of the MLP output projection.

With grouped KV heads a head index is a KV head: the KV head and its whole query group move.

Departures from the seed's code, which checks none of this: `validate(model)` rejects an out-of-range
layer or index, a slot used twice (within one field or across the fields of its kind, heads or
columns: the seed applies swaps one after another and unapplies by applying them again in the same
order, which restores the weights only when no slot repeats; such a key would also have its gradient
scaled twice), and unknown fields; each error names the offending swap. A same-layer swap of a whole
head or column is applied as the seed applies it (the layout changes, the function does not: units of
one layer are interchangeable, so the swap hides nothing), with a warning naming it. Every key the
seed's generator writes (slots shuffled, paired across layers, none reused) loads and applies as there.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("attn_heads", "mlp_cols", "attn_out_heads", "mlp_up_cols", "mlp_down_cols")
KIND = {"attn_heads": "head", "attn_out_heads": "head", "mlp_cols": "col", "mlp_up_cols": "col", "mlp_down_cols": "col"}
UNIT = {"head": "head", "col": "MLP column"}
WHOLE = ("attn_heads", "mlp_cols")  # swaps of whole units: a same-layer one leaves the function unchanged

Slot = tuple[int, int]
Swap = tuple[Slot, Slot]


def _swap(item, where: str) -> Swap:
    try:
        (la, ia), (lb, ib) = item
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a swap is [[layer_a, idx_a], [layer_b, idx_b]], got {item!r}") from None
    values = (la, ia, lb, ib)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: layers and indices must be ints, got {item!r}")
    return (la, ia), (lb, ib)


@dataclass
class PermutationKey:
    """A secret permutation key: per field, a list of swaps `((layer_a, idx_a), (layer_b, idx_b))`."""

    attn_heads: list[Swap] = field(default_factory=list)
    mlp_cols: list[Swap] = field(default_factory=list)
    attn_out_heads: list[Swap] = field(default_factory=list)
    mlp_up_cols: list[Swap] = field(default_factory=list)
    mlp_down_cols: list[Swap] = field(default_factory=list)

    def __post_init__(self):
        for f in FIELDS:
            setattr(self, f, [_swap(s, f"{f}[{i}]") for i, s in enumerate(getattr(self, f) or [])])

    # ------------------------------------------------------------------ the seed's JSON
    @classmethod
    def from_dict(cls, data: dict) -> PermutationKey:
        """A key from the seed's JSON mapping; an unknown field is an error naming the allowed ones."""
        if not isinstance(data, dict):
            raise ValueError(f"key: expected a JSON object with fields {list(FIELDS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ValueError(f"key: unknown fields {unknown}; allowed values: {list(FIELDS)}")
        for f, v in data.items():
            if not isinstance(v, list):
                raise ValueError(f"{f}: must be a list of swaps [[layer_a, idx_a], [layer_b, idx_b]], got {v!r}")
        return cls(**{f: data.get(f, []) for f in FIELDS})

    def to_dict(self) -> dict[str, list]:
        """The seed's JSON mapping (`attn_heads` and `mlp_cols` always present, other fields when non-empty)."""
        out = {}
        for f in FIELDS:
            swaps = getattr(self, f)
            if swaps or f in WHOLE:
                out[f] = [[[la, ia], [lb, ib]] for (la, ia), (lb, ib) in swaps]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the key as JSON, atomically."""
        from route.utils.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    # ------------------------------------------------------------------ inspection
    def swaps(self) -> Iterator[tuple[str, Slot, Slot]]:
        """Every swap as (field, slot_a, slot_b), in field order."""
        for f in FIELDS:
            for a, b in getattr(self, f):
                yield f, a, b

    def __len__(self) -> int:
        return sum(len(getattr(self, f)) for f in FIELDS)

    def subset(self, fraction: float, seed: int = 0) -> PermutationKey:
        """A key with `round(fraction * len(self))` of the swaps, drawn per (seed, fraction); for leak probes."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: must be in [0, 1], got {fraction!r}")
        items = list(self.swaps())
        chosen = set(random.Random(f"subset:{seed}").sample(range(len(items)), round(fraction * len(items))))
        out = PermutationKey()
        for i, (f, a, b) in enumerate(items):
            if i in chosen:
                getattr(out, f).append((a, b))
        return out

    def validate(self, model) -> PermutationKey:
        """Check the key against `model` (or a `route.models.tiered.layout.ModelLayout`); returns self.

        Raises a ValueError naming the offending swap for an out-of-range layer or index or a slot
        used twice; warns (UserWarning) about each same-layer swap of a whole head or column, which is
        applied but leaves the model's function unchanged.
        """
        from route.models.tiered.layout import ModelLayout, model_layout

        layout = model if isinstance(model, ModelLayout) else model_layout(model)
        size = {"head": layout.kv_heads, "col": layout.mlp_dim}
        used: dict[tuple[str, int, int], str] = {}
        for f in FIELDS:
            kind = KIND[f]
            for i, (a, b) in enumerate(getattr(self, f)):
                where = f"{f}[{i}] {[list(a), list(b)]}"
                for layer, idx in (a, b):
                    if not 0 <= layer < layout.num_layers:
                        raise ValueError(
                            f"{where}: layer {layer} out of range; the model has layers 0..{layout.num_layers - 1}"
                        )
                    if not 0 <= idx < size[kind]:
                        what = "KV heads" if kind == "head" and layout.group > 1 else f"{kind}s"
                        raise ValueError(
                            f"{where}: index {idx} out of range; each layer has {size[kind]} {what} "
                            f"(0..{size[kind] - 1})"
                        )
                if f in WHOLE and a[0] == b[0] and a != b:
                    warnings.warn(
                        f"{where}: a same-layer swap of a whole {UNIT[kind]} is applied but leaves the function "
                        "unchanged (units of a layer are interchangeable), so it hides nothing; swap across "
                        "layers to key it",
                        UserWarning,
                        stacklevel=2,
                    )
                for slot in (a, b):
                    prior = used.get((kind, *slot))
                    if prior is not None or a == b:
                        raise ValueError(
                            f"{where}: {kind} {list(slot)} is used twice (also in {prior or where}); "
                            "a key's swaps must not overlap"
                        )
                    used[(kind, *slot)] = where
        return self


def load_key(path: str | os.PathLike) -> PermutationKey:
    """Read a key in the seed's JSON format."""
    with open(Path(path)) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"key file {path}: not JSON ({e})") from None
    return PermutationKey.from_dict(data)


def _pair_across_layers(slots: list[Slot], rng: random.Random) -> list[Swap]:
    """Pair slots so that no pair shares a layer: always take from the layer with most slots left."""
    by_layer: dict[int, list[Slot]] = {}
    for s in slots:
        by_layer.setdefault(s[0], []).append(s)
    for v in by_layer.values():
        rng.shuffle(v)
    pairs = []
    while sum(len(v) for v in by_layer.values()) >= 2:
        layers = sorted(by_layer, key=lambda k: (-len(by_layer[k]), rng.random()))
        first = layers[0]
        others = [k for k in layers[1:] if by_layer[k]]
        if not by_layer[first] or not others:
            break
        second = rng.choice(others)
        pairs.append((by_layer[first].pop(), by_layer[second].pop()))
    return pairs


HEAD_FIELDS = ("attn_heads", "attn_out_heads")
MLP_FIELDS = ("mlp_cols", "mlp_up_cols", "mlp_down_cols")


def random_key(
    num_layers: int,
    kv_heads: int,
    mlp_dim: int,
    head_share: float,
    mlp_share: float,
    seed: int = 0,
    head_field: str = "attn_heads",
    mlp_field: str = "mlp_cols",
) -> PermutationKey:
    """A random valid key swapping about `head_share` of all heads and `mlp_share` of all MLP columns, each
    between two different layers; every layer contributes the same number of slots. The swaps go to
    `head_field` (whole heads, or only their output-projection columns) and `mlp_field` (whole columns, or
    only their input or output projection). The slots drawn do not depend on the fields. Pure function of
    its args."""
    for name, v in (("head_share", head_share), ("mlp_share", mlp_share)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {v!r}")
    for name, v, allowed in (("head_field", head_field, HEAD_FIELDS), ("mlp_field", mlp_field, MLP_FIELDS)):
        if v not in allowed:
            raise ValueError(f"{name}: invalid value {v!r}; allowed values: {list(allowed)}")
    if num_layers < 2 and (head_share or mlp_share):
        raise ValueError("num_layers: a key swaps across layers, so the model needs at least 2 layers")
    rng = random.Random(f"key:{seed}")
    key = PermutationKey()
    for f, units, share in ((head_field, kv_heads, head_share), (mlp_field, mlp_dim, mlp_share)):
        per_layer = round(share * units)
        slots = [(layer, i) for layer in range(num_layers) for i in sorted(rng.sample(range(units), per_layer))]
        setattr(key, f, sorted(_pair_across_layers(slots, rng)))
    return key


__all__ = ["FIELDS", "HEAD_FIELDS", "KIND", "MLP_FIELDS", "PermutationKey", "WHOLE", "load_key", "random_key"]
