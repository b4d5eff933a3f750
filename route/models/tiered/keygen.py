"""`route tiered-keygen`: draw a random valid permutation key (Tiered Alignment) and save it as JSON.

    route tiered-keygen --num_layers 4 --num_heads 4 --mlp_dim 256 --head_share 0.5 \
        --mlp_share 0.5 --seed 0 --out key.json
    route tiered-keygen --model PATH_OR_HUB_ID --head_share 0.25 --mlp_share 0.25 --out key.json

Every layer contributes the same share of its heads (KV heads with grouped attention) and MLP columns;
slots are paired across layers only (a same-layer swap of whole units hides nothing). The key is a pure
function of the sizes, shares and seed. Departure from the seed's code: it documents a key format but
ships no generator.
"""

from __future__ import annotations

import argparse

from route.models.paths import check_model_path
from route.models.tiered.key import HEAD_FIELDS, MLP_FIELDS, random_key
from route.utils.errors import ArgumentParser, at_least, cli


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    if args.model:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(args.model)
        layers = getattr(c, "num_layers", None) or c.num_hidden_layers
        heads = getattr(c, "num_heads", None) or c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        mlp = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
        return layers, kv, mlp
    for name in ("num_layers", "num_heads", "mlp_dim"):
        if getattr(args, name) is None:
            raise ValueError(f"{name}: give --{name} (or --model to read the sizes from a model config)")
    return args.num_layers, args.num_kv_heads or args.num_heads, args.mlp_dim


@cli("route tiered-keygen")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="route tiered-keygen", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Read the sizes from this model's config (local path or Hub id).")
    p.add_argument("--num_layers", type=int, default=None, help="Layers of the model.")
    p.add_argument("--num_heads", type=int, default=None, help="Attention heads per layer.")
    p.add_argument(
        "--num_kv_heads",
        type=int,
        default=None,
        help="KV heads per layer (grouped attention; default num_heads). Head indices are KV heads.",
    )
    p.add_argument("--mlp_dim", type=int, default=None, help="MLP columns (intermediate size) per layer.")
    p.add_argument("--head_share", type=float, default=0.25, help="Share of heads in the key, in [0, 1].")
    p.add_argument("--mlp_share", type=float, default=0.25, help="Share of MLP columns in the key, in [0, 1].")
    p.add_argument(
        "--head_field",
        default="attn_heads",
        choices=HEAD_FIELDS,
        help="Key field of the head swaps: whole heads, or only their attention output-projection columns.",
    )
    p.add_argument(
        "--mlp_field",
        default="mlp_cols",
        choices=MLP_FIELDS,
        help="Key field of the MLP swaps: whole columns, or only the input (up) or output (down) projection.",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the draw.")
    p.add_argument("--out", required=True, help="Where to write the key (JSON, the seed's format).")
    args = p.parse_args(argv)
    for name in ("num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
        at_least(f"--{name}", getattr(args, name))
    check_model_path("--model", args.model)
    from route.models.pretrained import resolve_model

    args.model = resolve_model(args.model, flag="--model")  # a short name: its converted checkpoint's config
    layers, kv, mlp = _sizes(args)
    key = random_key(layers, kv, mlp, args.head_share, args.mlp_share, args.seed, args.head_field, args.mlp_field)
    key.save(args.out)
    heads, cols = len(getattr(key, args.head_field)), len(getattr(key, args.mlp_field))
    print(f"{args.out}: {heads} head swaps ({args.head_field}), {cols} MLP column swaps ({args.mlp_field})")


if __name__ == "__main__":
    main()
