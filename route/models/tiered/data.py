"""Data for tiered pretraining, made in-process: a public procedural language and a keyed one.

Tiered Alignment's keyed configuration holds a capability the public one lacks. The offline miniature
here: the public data are the SGTM pretraining's "retain" language (`route.models.sgtm.data`); the keyed
capability is a second language over the *same* characters (its own lexicon, word order, suffixes and
verb -> object facts), so what separates the configurations is knowledge, not an alphabet that the
shared embeddings alone could carry. Character-level, packed into fixed-length blocks.
"""

from __future__ import annotations

import math

import torch

from route.models.sgtm.data import Language, char_tokenizer, language_texts, pack, procedural_texts

KEYED_LANGUAGE = Language("ptkmnslrw", "aeiou", "sov", "ni", "ra", "mo", "pi", seed=53)
KINDS = ("public", "keyed")


def texts(kind: str, blocks: int, seq_len: int, seed: int) -> list[str]:
    """Enough documents of one language for `blocks` blocks of `seq_len` characters; pure function of the args."""
    n = math.ceil(blocks * seq_len / 200) + 8
    if kind == "public":
        return procedural_texts("retain", n, seed)
    if kind == "keyed":
        return language_texts(KEYED_LANGUAGE, n, seed, name="keyed")
    raise ValueError(f"kind: invalid value {kind!r}; allowed values: {list(KINDS)}")


def build_data(train_blocks: int, eval_blocks: int, seq_len: int, seed: int) -> dict:
    """Tokenizer, training blocks per language and held-out blocks per language (other seeds)."""
    tok = char_tokenizer(None)
    train = {k: pack(texts(k, train_blocks, seq_len, seed), tok, seq_len)[:train_blocks] for k in KINDS}
    held = {k: pack(texts(k, eval_blocks, seq_len, seed + 10_000), tok, seq_len)[:eval_blocks] for k in KINDS}
    return {"tokenizer": tok, "train": train, "eval": held}


def sample(blocks: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` blocks drawn with replacement."""
    return blocks[torch.randint(len(blocks), (n,), generator=gen)]


__all__ = ["KEYED_LANGUAGE", "KINDS", "build_data", "sample", "texts"]
