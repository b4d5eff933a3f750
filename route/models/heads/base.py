"""The shared shell of a logit-space alignment head: `z = z_base + alpha * a` over a frozen causal LM.

`AlignedCausalLM` wraps any Hugging Face causal LM. One base forward gives the base logits and,
when the head needs them, the hidden states; the head turns those into an alignment vector `a`
of vocabulary width. Subclasses (`IAVForCausalLM`, `MAVForCausalLM`, `ConstantBiasForCausalLM`)
implement only `alignment(...)` and their settings.

How it departs from the alignment-vector papers it implements (IAV, MAV):
- The base is frozen for real: every base parameter has `requires_grad=False` and the base
  forward runs without autograd, so the base cannot move and alpha = 0 is the base model.
  At alpha = 0 the head is not evaluated at all: the logits are the base's, bitwise.
- Decoding keeps the base's KV cache and runs one base forward per new token; positions come
  from the attention mask (left padding works), never from the sequence length.
- `save_pretrained` stores the head only, plus the base's name or path; `from_pretrained`
  reloads the base from there (or takes one) and refuses a base with another vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"


@dataclass
class HeadOutput:
    """Forward result: the combined logits and their parts (alignment is None when alpha was 0)."""

    logits: torch.Tensor
    base_logits: torch.Tensor
    alignment: torch.Tensor | None
    past_key_values: Any = None


def vocab_size_of(base: nn.Module) -> int:
    """Width of the base's logits (rows of its output embedding)."""
    return int(base.get_output_embeddings().weight.shape[0])


def load_base(name_or_path: str | os.PathLike, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


HEAD_KINDS: dict[str, type] = {}  # kind -> head class; filled by route.models.heads (iav, mav, bias)


class AlignedCausalLM(nn.Module):
    """A frozen causal LM plus a trainable alignment head; `alpha` scales the head at every call."""

    kind = "abstract"
    needs_hidden_states = True

    def __init__(self, base: nn.Module, **settings: Any):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size_of(base)
        self.settings = settings

    def train(self, mode: bool = True) -> AlignedCausalLM:
        """Train or eval the head; the frozen base always runs in eval mode (no dropout in z_base)."""
        super().train(mode)
        self.base.eval()
        return self

    # ---- what TRL's trainers and Trainer read from a model ----
    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    def add_model_tags(self, tags) -> None:
        if hasattr(self.base, "add_model_tags"):
            self.base.add_model_tags(tags)

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters training moves (the head's, plus the base head when a subclass unfreezes it)."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_parameters(self) -> int:
        """Parameters the head adds to the base."""
        base_ids = {id(p) for p in self.base.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in base_ids)

    # ---- the head ----
    def alignment(self, hidden_states: tuple[torch.Tensor, ...] | None, base_logits: torch.Tensor) -> torch.Tensor:
        """The alignment vector `a`, shape (batch, seq, vocab)."""
        raise NotImplementedError

    def base_logits(self, out) -> torch.Tensor:
        """The base model's logits from its forward output (subclasses may recompute them with grad)."""
        return out.logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        alpha: float = 1.0,
        **kwargs: Any,
    ) -> HeadOutput:
        want_hidden = self.needs_hidden_states and alpha != 0
        z_base, hidden, past = self.base_forward(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, want_hidden, **kwargs
        )
        if alpha == 0:
            return HeadOutput(z_base, z_base, None, past)
        a = self.alignment(hidden, z_base).to(z_base.dtype)
        return HeadOutput(z_base + alpha * a, z_base, a, past)

    def base_forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        output_hidden_states: bool = True,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, Any]:
        """One frozen base forward: (base logits, hidden states cut to the logits' positions, KV cache).

        Several heads over the same base (e.g. a kept and a quarantine head) can share this one forward and
        each call `alignment(hidden, z_base)` on its result.
        """
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = positions_from_mask(attention_mask)
        with torch.no_grad():
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
        z_base = self.base_logits(out)
        hidden = None
        if output_hidden_states:  # logits_to_keep shortens the logits, not the hidden states
            hidden = tuple(h[:, -z_base.shape[1] :] for h in out.hidden_states)
        return z_base, hidden, out.past_key_values

    # ---- decoding ----
    def decode_step(self, alpha: float) -> Callable:
        """One decoding step at alignment strength `alpha`, for `decode`."""
        return causal_lm_step(self, alpha=alpha)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        alpha: float = 1.0,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | None = -1,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to `max_new_tokens` tokens at alignment strength `alpha` (KV cache, one base forward each).

        `eos_token_id`: -1 (default) takes the base's generation config, None never stops early.
        """
        cfg = self.generation_config
        eos = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        return decode(
            self.decode_step(alpha),
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            eos_token_id=eos,
            pad_token_id=pad,
            generator=generator,
        )

    # ---- persistence ----
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        head = {n: t for n, t in self.state_dict().items() if not n.startswith("base.") or n in trainable}
        return {n: t.detach().contiguous() for n, t in head.items()}

    def save_pretrained(self, save_directory: str | os.PathLike, base_name_or_path: str | None = None) -> None:
        """Write the head's weights and settings, with the base's name or path (not its weights), atomically."""
        from safetensors.torch import save_file

        from route.utils.io import atomic_dir

        name = base_name_or_path or getattr(self.base.config, "_name_or_path", "") or getattr(self, "base_path", "")
        meta = {
            "kind": self.kind,
            "base_name_or_path": str(name),
            "vocab_size": self.vocab_size,
            "base_hidden_size": getattr(self.base.config, "hidden_size", None),
            "settings": self.settings,
        }
        with atomic_dir(save_directory) as tmp:
            save_file(self.head_state_dict(), str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, base: nn.Module | str | None = None, **base_kwargs: Any
    ) -> AlignedCausalLM:
        """Load a saved head onto `base` (a model, a name or path; default: the base it was saved with)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).exists():
            raise ValueError(f"from_pretrained: {path} holds no {CONFIG_NAME}; it is not a saved alignment head")
        meta = json.loads((path / CONFIG_NAME).read_text())
        kind = meta["kind"]
        klass = HEAD_KINDS.get(kind)
        if klass is None or (cls is not AlignedCausalLM and klass is not cls):
            raise ValueError(f"from_pretrained: {path} holds a {kind!r} head, not {cls.kind!r}")
        if base is None:
            if not meta["base_name_or_path"]:
                raise ValueError(f"from_pretrained: {path} names no base model; pass base=")
            base = meta["base_name_or_path"]
        base_model = load_base(base, **base_kwargs) if isinstance(base, (str, os.PathLike)) else base
        vocab = vocab_size_of(base_model)
        if vocab != meta["vocab_size"]:
            raise ValueError(
                f"from_pretrained: vocabulary mismatch: the head at {path} was trained for a vocabulary "
                f"of {meta['vocab_size']} tokens, the base has {vocab}; a head moves only between "
                "bases that share the vocabulary"
            )
        model = klass(base_model, **meta["settings"])
        state = load_file(str(path / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        head_missing = [k for k in missing if not k.startswith("base.")]
        if head_missing or unexpected:
            raise ValueError(
                f"from_pretrained: {path} does not fit a {kind!r} head on this base "
                f"(missing {head_missing}, unexpected {unexpected})"
            )
        model.base_path = str(base) if isinstance(base, (str, os.PathLike)) else meta["base_name_or_path"]
        return model.to(base_model.device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only (left padding gets position 1, as Hugging Face generate does)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def causal_lm_step(model: nn.Module, **kwargs: Any) -> Callable:
    """A `decode` step for any causal LM (or head model): next-token logits and the updated KV cache."""

    def step(ids, mask, pos, past):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1], out.past_key_values

    return step


@torch.no_grad()
def decode(
    step: Callable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token-by-token decoding with a KV cache: `step(ids, mask, positions, past) -> (next_logits, past)`."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = 0 if pad_token_id is None else pad_token_id
    seq, mask = input_ids, attention_mask
    pos = positions_from_mask(mask)
    ids, past = seq, None
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for _ in range(max_new_tokens):
        logits, past = step(ids, mask, pos, past)
        logits = logits.float()
        if do_sample:
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(done, pad)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        if bool(done.all()):
            break
        ids, pos = nxt[:, None], pos[:, -1:] + 1
    return seq
