"""vLLM weight sync for a quarantine target, through TRL's own `VLLMGeneration.sync_weights`.

TRL 1.16 pushes weights to vLLM in `VLLMGeneration.sync_weights()` (trl/generation/vllm_generation.py), which
walks `self._iter_named_params()` and hands each `(name, tensor)` to the engine: `load_weights` per tensor in
colocate mode, `VLLMClient.update_named_params(metadata, iterator)` in server mode (the metadata is collected on the
first sync and cached), then `reset_prefix_cache()`. The trainer calls it once per `global_step`
(`GRPOTrainer._last_loaded_step`), i.e. at most once per optimizer step.

For a PEFT model, TRL's `_iter_named_params` merges the active adapters into the base weights in place
(`merge_adapter()`), yields them, and unmerges. That is wrong for a quarantine target twice over:

- it merges every active adapter, the quarantine included, whatever `generation_policy` says (forward hooks such
  as `target.ablated()` do not reach a weight merge), so vLLM would sample from the training policy;
- in-place merge/unmerge rounds the base weights on every sync (in bf16 visibly), so they drift over a run.

Departure from TRL: only the weight *source* is replaced. `TargetWeightSync.install(vllm_generation)` binds
`_iter_named_params` of that one `VLLMGeneration` instance to `named_params()`, which yields
`target.deployed_state_dict()` (`generation_policy: deployed`) or `target.merged_state_dict(quarantine=True)`
(`full`), or `target.merged_state_dict(scale=s)` for a sync at quarantine scale s (`scale=`, or `use_scale(s)` before
a sync: the trainer sets each generation batch's rollout scale, `route.trainer.rollout`): merged in fp32,
out of place, cast once to each weight's dtype; the training weights are only read.
Names are the plain transformers model's (what vLLM's `load_weights` expects, as TRL's own PEFT path produces);
tied duplicates (e.g. `lm_head.weight` tied to the embeddings) and buffers are not pushed, as in TRL. Names,
dtypes and shapes are checked to stay identical across syncs, since the server caches the metadata. Everything
else (when to sync, colocate vs server, sleep mode, tensor parallelism, the generation itself) is TRL's code.

Colocate mode also works around TRL calling the engine's `load_weights` outside vLLM's layerwise reload, which fails
on engines that repack weights after loading (vLLM's CPU backend), and around that reload leaving a tied output
layer stale (`engine_reload`, `refresh_tied_layers`; docs/vllm.md has the details).

Distributed: under DeepSpeed ZeRO-3 the parameters are gathered for the merge with TRL's `DistributedBackend`
(every process iterates, as TRL's collectives need); ZeRO-2 and DDP need no gather. FSDP is refused (sharded
parameters would need a per-module merge that no target implements yet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from route.targets import Target

GenerationPolicy = str  # "full" | "deployed"


def policy_state_dict(target: Target, generation_policy: GenerationPolicy,
                      scale: float | None = None) -> dict[str, Tensor]:
    """The plain model's weights of the policy that generates: deployed (quarantine ablated) or full (merged); a
    `scale` in [0, 1] overrides both: the quarantine merged times `scale` (the policy of `target.scaled(scale)`)."""
    if scale is not None:
        return target.merged_state_dict(scale=scale)
    if generation_policy == "deployed":
        return target.deployed_state_dict()
    if generation_policy == "full":
        return target.merged_state_dict(quarantine=True)
    raise ValueError(f"generation_policy: invalid value {generation_policy!r}; allowed values: ['full', 'deployed']")


def vllm_name(name: str) -> str:
    """A (PEFT-wrapped) parameter name -> the plain model's name, the rule TRL's `_iter_named_params` applies."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _not_pushed(model: nn.Module) -> frozenset[str]:
    """Names TRL never pushes: tied duplicates of a parameter (named_parameters dedups them) and buffers."""
    unique = {vllm_name(n) for n, _ in model.named_parameters()}
    every = {vllm_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {vllm_name(n) for n, _ in model.named_buffers()}
    return frozenset((every | buffers) - unique)


Signature = list[tuple[str, str, tuple[int, ...]]]


class TargetWeightSync:
    """The weight source of TRL's vLLM sync: the target's merged generating policy.

    Args:
        target: the quarantine target (any `route.targets.Target`).
        generation_policy: "deployed" pushes `target.deployed_state_dict()`, "full" pushes
            `target.merged_state_dict(quarantine=True)`.
        gather: a context manager factory that materialises sharded parameters for the merge (TRL's
            `DistributedBackend.gather_params`; a no-op when None).
        scale: push the policy at this quarantine scale instead (`target.merged_state_dict(scale=scale)`, what
            `target.scaled(scale)` runs), e.g. to sample a scale curve with vLLM.
    """

    def __init__(self, target: Target, generation_policy: GenerationPolicy,
                 gather: Callable[[list[nn.Parameter]], contextlib.AbstractContextManager] | None = None,
                 scale: float | None = None):
        from route.masks import check_scale

        self.scale = None if scale is None else check_scale(scale)
        if generation_policy not in ("full", "deployed"):
            raise ValueError(f"generation_policy: invalid value {generation_policy!r}; "
                             "allowed values: ['full', 'deployed']")
        self.target = target
        self.generation_policy = generation_policy
        self.gather = gather
        self.signature: Signature | None = None
        self._skip: frozenset[str] | None = None
        self.reload: Callable[[], contextlib.AbstractContextManager] | None = None

    def use_scale(self, scale: float) -> bool:
        """Push the policy at quarantine `scale` from the next sync on (0: the deployed weights, 1: the full merge, in
        between `merged_state_dict(scale=scale)`); returns whether that changes what a sync pushes."""
        from route.masks import check_scale

        before = self.pushed_scale()
        scale = check_scale(scale)
        if 0.0 < scale < 1.0:
            self.scale = scale
        else:
            self.generation_policy, self.scale = ("deployed" if scale == 0.0 else "full"), None
        return self.pushed_scale() != before

    def pushed_scale(self) -> float:
        """The quarantine scale of the policy a sync pushes (0 deployed, 1 full)."""
        if self.scale is not None:
            return self.scale
        return 0.0 if self.generation_policy == "deployed" else 1.0

    def state_dict(self) -> dict[str, Tensor]:
        """What one sync pushes, in push order: name -> tensor (fresh tensors; the training weights are only read)."""
        model = self.target.model
        gather = self.gather(list(model.parameters())) if self.gather else contextlib.nullcontext()
        with torch.no_grad(), gather:
            weights = policy_state_dict(self.target, self.generation_policy, self.scale)
        if self._skip is None:
            self._skip = _not_pushed(model)
        return {k: v for k, v in weights.items() if k not in self._skip}

    def named_params(self) -> Iterator[tuple[str, Tensor]]:
        """`VLLMGeneration._iter_named_params` replacement: yields (vLLM name, tensor) for one sync.

        In colocate mode the whole walk runs inside vLLM's layerwise reload (`engine_reload`), so TRL's per-tensor
        `load_weights` calls reach layers whose weights the engine had repacked after loading.
        """
        weights = self.state_dict()
        signature = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in weights.items()]
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            changed = sorted({s[0] for s in signature} ^ {s[0] for s in self.signature}) or [
                a for a, b in zip(signature, self.signature) if a != b][:3]
            raise RuntimeError(f"vLLM sync: names, dtypes or shapes changed between syncs ({changed}); "
                               "the vLLM server caches them after the first sync")
        with self.reload() if self.reload else contextlib.nullcontext():
            yield from weights.items()

    def install(self, vllm_generation: Any) -> None:
        """Make TRL's `vllm_generation.sync_weights()` push this source (an instance-level override, nothing else)."""
        dist = getattr(vllm_generation, "_dist", None)
        if dist is not None and dist.is_fsdp:
            raise ValueError("use_vllm: the quarantine weight sync does not support FSDP; use DeepSpeed or DDP")
        if self.gather is None and dist is not None:
            self.gather = dist.gather_params
        if vllm_generation.mode == "colocate":
            self.reload = engine_reload(vllm_generation)
        vllm_generation._iter_named_params = self.named_params


def engine_reload(vllm_generation: Any) -> Callable[[], contextlib.AbstractContextManager] | None:
    """vLLM's layerwise reload around one colocate sync, or None when the engine has none (vLLM < 0.31, the fake).

    TRL's colocate sync calls `model.load_weights([(name, tensor)])` on the engine's model, which only works while
    every parameter still is the one vLLM created (with its `weight_loader`). Backends that repack weights after
    loading replace them: the CPU backend's `process_weights_after_loading` swaps each linear layer's `weight` for an
    empty plain `Parameter` (the weight lives in a prepacked GEMM handle), so the first QKV push raises
    `AttributeError: 'Parameter' object has no attribute 'weight_loader'`. vLLM's own `reload_weights` brackets
    `load_weights` with `initialize_layerwise_reload` (restores the loadable parameters, buffers each layer's
    tensors) and `finalize_layerwise_reload` (re-runs the repacking); this does the same around TRL's walk, then
    `refresh_tied_layers`.
    """
    try:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError:
        return None
    runner = vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner
    model = runner.get_model()

    @contextlib.contextmanager
    def reload() -> Iterator[None]:
        with set_current_vllm_config(runner.vllm_config):
            initialize_layerwise_reload(model)
            try:
                yield
            finally:
                finalize_layerwise_reload(model, runner.model_config)
                refresh_tied_layers(model)

    return reload


def refresh_tied_layers(model: nn.Module) -> None:
    """Re-run the weight processing of unquantized layers whose weight is tied to another layer's (e.g. `lm_head`).

    vLLM's layerwise reload processes a tied weight only through the layer that loads it (its documented limitation
    2): the embedding gets the new values in place, but on CPU the tied `lm_head` keeps the GEMM handle prepacked
    from the old ones, so logits would come from the old embeddings. Re-processing the tied layer repacks it (on GPU
    the unquantized embedding's processing is a no-op).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        tied = bool(params) and all(id(p) in owner for p in params)
        for p in params:
            owner.setdefault(id(p), module)
        if tied and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


def engine_logprobs(llm: Any, ids: list[list[int]]) -> list[Tensor]:
    """The engine's log-prob of every token of each sequence after the first (its prompt log-probs, one forward)."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    return [torch.tensor([lp[t].logprob for t, lp in zip(i[1:], o.prompt_logprobs[1:], strict=True)])
            for i, o in zip(ids, outs, strict=True)]


def model_logprobs(model: nn.Module, ids: list[list[int]],
                   ctx: contextlib.AbstractContextManager | None = None) -> list[Tensor]:
    """The same log-probs from `model`'s forward (in eval mode, inside `ctx`, e.g. `target.ablated()`), in fp32."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad(), ctx or contextlib.nullcontext():
            for i in ids:
                logits = model(input_ids=torch.tensor([i])).logits[0, :-1].float()
                out.append(logits.log_softmax(-1).gather(1, torch.tensor(i[1:]).view(-1, 1)).view(-1))
    finally:
        model.train(was_training)
    return out


def max_gap(a: list[Tensor], b: list[Tensor]) -> float:
    """The largest per-token difference between two lists of log-prob vectors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
