"""Pretraining data for SGTM: procedural languages made in-process, Hub or local datasets, and label noise.

(SGTM: selective gradient masking; gradient routing: Cloud et al. 2024.)

The SGTM seed's bilingual TinyStories experiment (remove Spanish, keep English) needs a download
and hours of compute. The offline default here is its miniature: three procedural "languages"
with a shared grammar skeleton, each with its own sound inventory and lexicon, word order,
agreement suffixes and verb -> object preferences (facts a model must memorise):

- `retain`: the language to keep;
- `forget`: the language to remove;
- `adjacent`: shares the forget language's sounds and word order with its own lexicon (the
  seed's "forget-adjacent" data: near the forget data, to be kept).

Real data: any Hub dataset name or local path (a `save_to_disk` folder, a `.jsonl`/`.json`/
`.csv`/`.txt`/`.parquet` file) with a text column, packed into blocks after tokenizing.

Label noise follows the seed's knobs: a forget block is labeled forget with probability `tpr`
(1 - the undiscovered rate), a non-forget block with probability `fpr`; false positives are
drawn from the adjacent data when there is any. `tpr_fpr_from_precision_recall` converts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("forget", "retain", "adjacent")
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass(frozen=True)
class Language:
    """A procedural language: sounds, lexicon sizes, word order and the seed of its lexicon."""

    consonants: str
    vowels: str
    order: str  # "svo" or "sov"
    plural: str  # noun plural suffix
    agree: str  # verb suffix agreeing with a plural subject
    det: str
    conj: str
    seed: int


LANGUAGES = {
    "retain": Language("ptkmnslrw", "aeiou", "svo", "s", "t", "ta", "ke", seed=11),
    "forget": Language("bdgvzfhj", "aeiouy", "sov", "en", "u", "ol", "ve", seed=23),
    "adjacent": Language("bdgvzfhj", "aeiouy", "sov", "en", "u", "ol", "ve", seed=37),
}


class _Lexicon:
    def __init__(self, lang: Language, n_nouns: int = 48, n_verbs: int = 24, n_adj: int = 16, objects: int = 4):
        rng = random.Random(lang.seed)
        seen: set[str] = {lang.det, lang.conj}

        def word(syllables: int) -> str:
            while True:
                w = "".join(rng.choice(lang.consonants) + rng.choice(lang.vowels) for _ in range(syllables))
                if w not in seen:
                    seen.add(w)
                    return w

        self.lang = lang
        self.nouns = [word(rng.choice((2, 2, 3))) for _ in range(n_nouns)]
        self.verbs = [word(rng.choice((2, 3))) for _ in range(n_verbs)]
        self.adjs = [word(2) for _ in range(n_adj)]
        self.objects = {v: rng.sample(self.nouns, objects) for v in self.verbs}  # what each verb takes

    def phrase(self, rng: random.Random, noun: str | None = None) -> tuple[str, bool]:
        noun = noun or rng.choice(self.nouns)
        plural = rng.random() < 0.4
        adj = [rng.choice(self.adjs)] if rng.random() < 0.4 else []
        return " ".join([self.lang.det, *adj, noun + (self.lang.plural if plural else "")]), plural

    def sentence(self, rng: random.Random) -> str:
        verb = rng.choice(self.verbs)
        subj, plural = self.phrase(rng)
        obj, _ = self.phrase(rng, rng.choice(self.objects[verb]))
        v = verb + (self.lang.agree if plural else "")
        words = [subj, v, obj] if self.lang.order == "svo" else [subj, obj, v]
        if rng.random() < 0.25:
            return " ".join(words) + " " + self.lang.conj + " " + self.sentence(rng)
        return " ".join(words)


def procedural_texts(kind: str, n: int, seed: int, min_chars: int = 200) -> list[str]:
    """`n` documents (sentences joined by ". ") of one procedural language; a pure function of (kind, n, seed)."""
    if kind not in LANGUAGES:
        raise ValueError(f"kind: invalid value {kind!r}; allowed values: {list(LANGUAGES)}")
    return language_texts(LANGUAGES[kind], n, seed, min_chars, name=kind)


def language_texts(lang: Language, n: int, seed: int, min_chars: int = 200, name: str = "") -> list[str]:
    """`n` documents of any procedural `Language`; a pure function of (lang, n, seed, name)."""
    lex = _Lexicon(lang)
    rng = random.Random(f"{name}:{seed}")
    docs = []
    for _ in range(n):
        parts, size = [], 0
        while size < min_chars:
            parts.append(lex.sentence(rng))
            size += len(parts[-1]) + 2
        docs.append(". ".join(parts) + ".")
    return docs


def char_tokenizer(texts: Sequence[str] | None = None):
    """A character-level fast tokenizer (pad/eos/unk specials) over the characters of `texts`
    (default: the procedural languages' alphabet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts))) if texts else sorted(set("abcdefghijklmnopqrstuvwxyz .,"))
    vocab = {tok: i for i, tok in enumerate((PAD, EOS, UNK, *chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def load_texts(source: str, text_column: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    """Texts of a Hub dataset (by name) or a local dataset folder/file."""
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))  # a save_to_disk folder
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    elif path.is_file():
        fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}.get(
            path.suffix)
        if fmt is None:
            raise ValueError(f"data: cannot read {source}; allowed file types: .jsonl .json .csv .txt .parquet")
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(source, split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"text_column: {text_column!r} is not a column of {source}; allowed values: "
                         f"{ds.column_names}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [t for t in ds[text_column] if t]


def pack(texts: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize, join with EOS and cut into (n, seq_len) blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"data: {len(stream)} tokens do not fill one block of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tpr_fpr_from_precision_recall(precision: float, recall: float, positive: float, negative: float
                                  ) -> tuple[float, float]:
    """(tpr, fpr) of a labeler with this precision and recall, for `positive` forget and `negative` candidates."""
    if not 0 < precision <= 1 or not 0 <= recall <= 1:
        raise ValueError(f"precision, recall: need precision in (0, 1] and recall in [0, 1], got {precision}, {recall}")
    fpr = recall * positive * (1 - precision) / (precision * negative) if negative > 0 else 0.0
    if fpr > 1:
        raise ValueError(f"precision: {precision} with recall {recall} needs fpr {fpr:.3f} > 1 on this data")
    return recall, fpr


def noisy_labels(kinds: Sequence[str], tpr: float, fpr: float, seed: int) -> list[str]:
    """Labels for blocks of known kinds: forget blocks labeled forget w.p. `tpr`; false positives (prob `fpr`)
    come from the adjacent blocks when there are any, else from the retain blocks."""
    rng = random.Random(f"labels:{seed}")
    negative = "adjacent" if "adjacent" in kinds else "retain"
    out = []
    for k in kinds:
        u = rng.random()
        if k == "forget":
            out.append("forget" if u < tpr else "retain")
        elif k == negative and u < fpr:
            out.append("forget")
        else:
            out.append(k)
    return out


__all__ = ["KINDS", "LANGUAGES", "Language", "char_tokenizer", "language_texts", "load_texts", "noisy_labels", "pack",
           "procedural_texts", "tpr_fpr_from_precision_recall"]
