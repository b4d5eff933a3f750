"""Tiny SGTM models built in-process for the mask-core and SGTM tests (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import GPTNeoConfig, LlamaConfig, Qwen2Config

VOCAB = 40


def gpt_neo_config(**sgtm) -> GPTNeoConfig:
    """2 layers (global + local attention), 4 heads of 8, MLP 64; initializer_range large enough for clear grads."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                  attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=32,
                  intermediate_size=64, initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return GPTNeoConfig(**{**fields, **sgtm})


def llama_config(qwen: bool = False, **sgtm):
    """2 layers, 4 query heads sharing 2 KV heads (groups of 2), MLP 64, tied embeddings."""
    cls = Qwen2Config if qwen else LlamaConfig
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=True, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return cls(**{**fields, **sgtm})


def ids(n: int = 4, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, length), generator=g)


def summed_loss(model, input_ids: torch.Tensor, sgtm_mode=None) -> torch.Tensor:
    """Next-token cross-entropy summed over rows, so per-row gradients add up across batches."""
    kwargs = {} if sgtm_mode is None else {"sgtm_mode": sgtm_mode}
    logits = model(input_ids=input_ids, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             input_ids[:, 1:].reshape(-1), reduction="sum")


def one_thread():
    """Generator for an autouse fixture: tiny models run far faster on one intra-op thread on a loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter, biases and norms included, redrawn from N(0, std) (N(1, std) for norm weights).

    Zero-initialised biases (c_fc, the head bias) would hide a bias that is not moved or not re-initialised.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        p.copy_(noise + (1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0))
    return model
