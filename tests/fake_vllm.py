"""A recording fake of the vLLM objects TRL 1.16 calls, so the vLLM path can be tested on CPU.

What TRL touches (trl/generation/vllm_generation.py, trl/trainer/grpo_trainer.py):

- colocate: `LLM(model=..., seed=..., ...)`, `llm.generate(prompts, sampling_params=..., use_tqdm=...)` returning
  `RequestOutput`-like objects, `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`,
  `llm.reset_prefix_cache()`, `llm.llm_engine.model_config.max_model_len`, and `SamplingParams(**kwargs)`;
- server: `VLLMClient(base_url=..., group_port=..., connection_timeout=...)`, `init_communicator(device=...)`,
  `get_server_info()`, `update_named_params(metadata, iterator)`, `update_named_param(name, tensor)`,
  `reset_prefix_cache()` and `generate(prompts=..., n=..., ...)`.

Sleep mode is modelled as vLLM documents it: level 1 offloads the weights and restores them on `wake_up`, level 2
discards them (NaN until pushed again); loading or generating while the needed part sleeps raises.

Both sides are backed by a `FakeEngine`: a plain transformers model loaded from the model directory (as vLLM
loads `model.name_or_path`) that receives pushed weights as vLLM's `load_weights` does (copied into the named
parameter, cast to the engine's dtype; an unknown name or a wrong shape raises) and samples with temperature,
returning each sampled token's processed log-prob (after temperature, like `logprobs_mode="processed_logprobs"`).
So the sampling log-probs come from exactly the weights that were pushed.

Everything is recorded: every pushed tensor (a clone) grouped into syncs, and every call with the frames of the
code that made it, so tests can check that the caller is TRL's own code.

`install_fake_vllm(monkeypatch)` puts a fake `vllm` package into `sys.modules` and binds the names that
`trl.generation.vllm_generation` would have imported from it (`LLM`, `SamplingParams`, ...) plus its
`VLLMClient`; monkeypatch removes all of it after the test.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch


def caller_frames(depth: int = 4) -> list[tuple[str, str]]:
    """(file, function) of the callers of the fake method that calls this, innermost first (fake frames skipped)."""
    out = []
    frame = sys._getframe(1)
    while frame is not None and len(out) < depth:
        code = frame.f_code
        if code.co_filename != __file__:
            out.append((code.co_filename, code.co_name))
        frame = frame.f_back
    return out


@dataclass
class Call:
    method: str
    frames: list[tuple[str, str]]


@dataclass
class Sync:
    """One weight sync: the tensors pushed (clones, in push order) and, in server mode, the announced metadata."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: list[tuple[str, str, list[int]]] | None = None

    @property
    def meta(self) -> list[tuple[str, str, list[int]]]:
        return [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in self.tensors.items()]


class FakeEngine:
    """A transformers model standing in for the vLLM engine: takes pushed weights, samples, records everything."""

    def __init__(self, model: str, seed: int = 0, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM

        self.model_path = model
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        self.params = dict(self.model.named_parameters())
        self.eos_token_id = self.model.config.eos_token_id
        self.pad_token_id = self.model.config.pad_token_id or 0
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[Call] = []
        self.syncs: list[Sync] = []
        self._open: Sync | None = None
        self.sleep_level = 0  # 0 awake; vLLM's sleep levels: 1 offloads the weights, 2 discards them
        self.sleeping: set[str] = set()  # "weights", "kv_cache": what is not mapped back yet
        self._offloaded: dict[str, torch.Tensor] | None = None

    def record(self, method: str) -> None:
        self.calls.append(Call(method, caller_frames()))

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    # ------------------------------------------------------------------ sleep mode
    @torch.no_grad()
    def sleep(self, level: int) -> None:
        """Level 1 keeps a copy of the weights to restore on wake-up; level 2 discards them (NaN until pushed)."""
        if level not in (1, 2):
            raise ValueError(f"fake vLLM: sleep level {level}")
        if level == 1:
            self._offloaded = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self._offloaded = None
            for p in self.params.values():
                p.fill_(float("nan"))
        self.sleep_level, self.sleeping = level, {"weights", "kv_cache"}

    @torch.no_grad()
    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = set(tags or ("weights", "kv_cache"))
        if "weights" in tags & self.sleeping and self._offloaded is not None:
            for n, p in self.params.items():
                p.copy_(self._offloaded[n])
            self._offloaded = None
        self.sleeping -= tags
        if not self.sleeping:
            self.sleep_level = 0

    def check_awake(self, what: str) -> None:
        if what in self.sleeping:
            raise RuntimeError(f"fake vLLM: {what} used while asleep (level {self.sleep_level})")

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.check_awake("weights")
        if name not in self.params:
            raise KeyError(f"fake vLLM: no parameter named {name!r}")
        param = self.params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"fake vLLM: {name} has shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
        if self._open is None:
            self._open = Sync()
        if name in self._open.tensors:
            raise ValueError(f"fake vLLM: {name} pushed twice in one sync")
        self._open.tensors[name] = tensor.detach().clone()
        param.copy_(tensor)

    def close_sync(self, metadata=None) -> None:
        if self._open is not None:
            self._open.metadata = metadata
            self.syncs.append(self._open)
            self._open = None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int
               ) -> list[tuple[list[int], list[float]]]:
        """n completions per prompt, in prompt order: (token ids, processed log-prob of each sampled token).

        All rows step together (left-padded, positions counted from each row's first token, as vLLM sees them);
        a row stops after its EOS token.
        """
        self.check_awake("weights")
        self.check_awake("kv_cache")
        rows = [list(p) for p in prompts for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        done = torch.zeros(len(rows), dtype=torch.bool)
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        for _ in range(max_tokens):
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            logp = torch.log_softmax(logits.float() / temperature, -1)
            tok = torch.multinomial(logp.exp(), 1, generator=self.generator).view(-1)
            for i in (~done).nonzero().view(-1).tolist():
                tokens[i].append(int(tok[i]))
                logps[i].append(float(logp[i, tok[i]]))
            live = ~done
            done = done | (tok == self.eos_token_id)
            ids = torch.cat([ids, tok.view(-1, 1)], 1)
            mask = torch.cat([mask, live.long().view(-1, 1)], 1)
            if bool(done.all()):
                break
        return list(zip(tokens, logps, strict=True))


# ---------------------------------------------------------------------- colocate: vllm.LLM and friends
class SamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, max_tokens: int = 16, logprobs: int | None = None,
                 top_p: float = 1.0, top_k: int | None = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 **kwargs: Any):
        unsupported = {"top_p": top_p != 1.0, "top_k": top_k not in (0, -1, None), "min_p": min_p not in (0, None),
                       "repetition_penalty": repetition_penalty != 1.0}
        if any(unsupported.values()) or kwargs:
            raise NotImplementedError(f"fake vLLM: unsupported sampling settings {unsupported} {kwargs}")
        self.n, self.temperature, self.max_tokens, self.logprobs = n, temperature, max_tokens, logprobs


@dataclass
class Logprob:
    logprob: float
    rank: int = 1


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class _WeightModel:
    """`llm.llm_engine.model_executor.driver_worker.model_runner.model`: only `load_weights`."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine

    def load_weights(self, weights) -> None:
        self.engine.record("load_weights")
        for name, tensor in weights:
            self.engine.load(name, tensor)


class LLM:
    """The colocated engine TRL builds with `LLM(model=model.name_or_path, ...)`."""

    instances: list[LLM] = []

    def __init__(self, model: str, seed: int = 0, max_model_len: int | None = None, **kwargs: Any):
        self.kwargs = dict(kwargs, model=model, seed=seed, max_model_len=max_model_len)
        self.engine = FakeEngine(model, seed=seed)
        self.engine.record("LLM")
        weights = _WeightModel(self.engine)
        config = self.engine.model.config
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=max_model_len or config.max_position_embeddings),
            model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=weights))))
        type(self).instances.append(self)

    def generate(self, prompts: list[dict], sampling_params: SamplingParams, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        self.engine.record("generate")
        sp = sampling_params
        prompt_ids = [list(p["prompt_token_ids"]) for p in prompts]
        samples = iter(self.engine.sample(prompt_ids, sp.n, sp.temperature, sp.max_tokens))
        results = []
        for ids in prompt_ids:
            outs = []
            for toks, logps in (next(samples) for _ in range(sp.n)):
                lps = None if sp.logprobs is None else [{t: Logprob(lp, 1)} for t, lp in zip(toks, logps)]
                outs.append(CompletionOutput(toks, lps))
            results.append(RequestOutput(ids, outs))
        return results

    def reset_prefix_cache(self) -> None:
        self.engine.record("reset_prefix_cache")
        self.engine.close_sync()

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("fake vLLM: sleep without enable_sleep_mode")
        self.engine.record(f"sleep({level})")
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.record(f"wake_up({','.join(tags or ['all'])})")
        self.engine.wake_up(tags)


class StructuredOutputsParams:
    def __init__(self, **kwargs: Any):
        raise NotImplementedError("fake vLLM: structured outputs are not supported")


# ---------------------------------------------------------------------- server: trl's VLLMClient
class FakeVLLMClient:
    """Stands in for `trl.generation.vllm_client.VLLMClient` talking to `trl vllm-serve` (HTTP + NCCL).

    The fake server serves `model_path` (set by `install_fake_vllm`). `update_named_params` checks the streamed
    tensors against the announced metadata in order, as the NCCL receiver would, and loads them.
    """

    model_path: str | None = None
    instances: list[FakeVLLMClient] = []

    def __init__(self, base_url: str | None = None, host: str = "0.0.0.0", server_port: int = 8000,
                 group_port: int = 51216, connection_timeout: float = 0.0):
        if self.model_path is None:
            raise RuntimeError("fake vLLM server: no model (install_fake_vllm(..., server_model=...))")
        self.base_url = base_url or f"http://{host}:{server_port}"
        self.engine = FakeEngine(self.model_path)
        self.engine.record("VLLMClient")
        self.communicator = None
        type(self).instances.append(self)

    def get_server_info(self) -> dict:
        self.engine.record("get_server_info")
        return {"model_config": {"logprobs_mode": "processed_logprobs"}, "weight_transfer_config": {"backend": "nccl"}}

    def init_communicator(self, device: Any = 0) -> None:
        self.engine.record("init_communicator")
        self.communicator = object()

    def update_named_params(self, metadata: list[tuple[str, str, list[int]]], named_params) -> None:
        self.engine.record("update_named_params")
        if self.communicator is None:
            raise RuntimeError("fake vLLM server: update_named_params before init_communicator")
        metadata = [(n, d, list(s)) for n, d, s in metadata]
        received = 0
        for i, (name, tensor) in enumerate(named_params):
            if i >= len(metadata):
                raise ValueError(f"fake vLLM server: {name} streamed beyond the {len(metadata)} announced tensors")
            expected = metadata[i]
            got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
            if got != expected:
                raise ValueError(f"fake vLLM server: tensor {i} is {got}, announced {expected}")
            self.engine.load(name, tensor)
            received += 1
        if received != len(metadata):
            raise ValueError(f"fake vLLM server: {received} tensors streamed, {len(metadata)} announced")
        self.engine.close_sync(metadata)

    def update_named_param(self, name: str, weights: torch.Tensor) -> None:
        self.update_named_params([(name, str(weights.dtype).removeprefix("torch."), list(weights.shape))],
                                 iter([(name, weights)]))

    def reset_prefix_cache(self) -> None:
        self.engine.record("reset_prefix_cache")

    def generate(self, prompts: list[list[int]], features=None, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 16, logprobs: int | None = 0, **kwargs: Any) -> dict:
        self.engine.record("generate")
        rest = {k: v for k, v in kwargs.items() if k not in ("structured_outputs_regex", "generation_kwargs")}
        SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=logprobs, **rest)
        if features is not None or kwargs.get("structured_outputs_regex") or kwargs.get("generation_kwargs"):
            raise NotImplementedError("fake vLLM server: features, structured outputs and generation_kwargs")
        out = {"prompt_ids": [list(ids) for ids in prompts], "completion_ids": [], "logprobs": [],
               "logprob_token_ids": []}
        for toks, logps in self.engine.sample(out["prompt_ids"], n, temperature, max_tokens):
            out["completion_ids"].append(toks)
            out["logprobs"].append([[lp] for lp in logps])
            out["logprob_token_ids"].append([[t] for t in toks])
        return out

    def close_communicator(self) -> None:
        self.communicator = None


# ---------------------------------------------------------------------- installation
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def restore_env_after(monkeypatch) -> None:
    """Undo, after the test, what TRL's colocate init writes into os.environ (`ENV_KEYS`)."""
    for key in ENV_KEYS:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.setenv(key, "unset")
            monkeypatch.delenv(key)


def install_fake_vllm(monkeypatch, server_model: str | os.PathLike | None = None) -> types.ModuleType:
    """Make TRL see the fake `vllm`; everything (incl. the env vars TRL's colocate init sets) is undone after."""
    import trl.generation.vllm_generation as vg

    fake = types.ModuleType("vllm")
    fake.__path__ = []  # a package, so `vllm.sampling_params` resolves
    fake.__version__ = "0.31.0"
    fake.LLM, fake.SamplingParams, fake.RequestOutput = LLM, SamplingParams, RequestOutput
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = StructuredOutputsParams
    sampling.SamplingParams = SamplingParams
    fake.sampling_params = sampling
    platforms = types.ModuleType("vllm.platforms")  # a GPU platform: sleep mode exists
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: True)
    fake.platforms = platforms
    for name in [n for n in sys.modules if n.startswith("vllm.")]:  # a real vLLM imported earlier: out of the way
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    # the names `if is_vllm_available(): from vllm import ...` binds at trl's import time
    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    for name, value in (("LLM", LLM), ("SamplingParams", SamplingParams), ("RequestOutput", RequestOutput),
                        ("StructuredOutputsParams", StructuredOutputsParams)):
        monkeypatch.setattr(vg, name, value, raising=False)
    client = type("FakeVLLMClient", (FakeVLLMClient,), {"model_path": str(server_model) if server_model else None,
                                                        "instances": []})
    monkeypatch.setattr(vg, "VLLMClient", client)
    monkeypatch.setattr(LLM, "instances", [])
    restore_env_after(monkeypatch)
    fake.FakeVLLMClient = client
    return fake
