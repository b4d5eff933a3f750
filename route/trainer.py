"""`RoutedGRPOTrainer`: TRL's GRPOTrainer with flags, routing modes and a gated loss.

Departures from plain GRPO (TRL 1.16), all through its documented override points:

- `_calculate_rewards`: after the rewards, each rollout is graded by the environment (ground
  truth, logged, never fed to the reward), the detector flags it, and it gets a routing mode
  (flagged -> forget under `route`; unflagged -> default, or retain with `retain_fraction`).
  `penalty` subtracts lambda from a flagged rollout's reward here, before advantages.
- `_generate_and_score_completions`: adds `routing_modes` to the batch (it survives TRL's
  shuffle and micro-batch split), zeroes flagged advantages under `filter`, and recomputes
  `old_per_token_logps` under the per-row gate whenever TRL scored a row under another policy.
- `_generate`: under `generation_policy: deployed`, sampling runs inside `target.ablated()`.
- vLLM (`use_vllm`, colocate or server): TRL's own `VLLMGeneration.sync_weights` pushes the weights, once per
  optimizer step; only its weight source is replaced (`route.vllm_sync.TargetWeightSync`): the target's
  deployed or fully merged weights, merged in fp32 out of place. TRL's importance-sampling correction compares
  vLLM's sampling log-probs with the trainer's forward of the *generating* policy (`_get_per_token_logps_and_entropies`
  runs inside `target.ablated()` while TRL scores a deployed-policy batch), so the quarantine's effect on forget
  rollouts is not mistaken for vLLM mismatch and masked; the PPO ratio then uses old log-probs under the gate.
- `_compute_loss`: the loss forward runs inside `target.gate(routing_modes)`: one forward,
  one backward for a batch that mixes modes. With `gradient_checkpointing`, the layers recomputed in that backward
  (after the context has exited) re-enter the gate their forward ran under (`route.targets.checkpointing`:
  non-reentrant checkpointing with a `context_fn` from the target's `recompute_context()`); setups that cannot do
  that (reentrant checkpointing, FSDP activation checkpointing, torch.compile) are refused at construction.
- `training_step` (targets with `after_backward` / `before_optimizer_step`, i.e. `svf`): after each micro-batch's
  backward the target scores the rollouts (`route_score`) and queues the routed rows' kept gradient for removal;
  after the last micro-batch of an optimizer step (before clipping) it applies the queue and `erase`. Under
  `route_score`, flags do not route by themselves: candidates (every rollout, or only flagged ones with
  `route_score_requires_flag`) run in default mode and are routed by score; `erase` runs every rollout in retain
  mode (the quarantine never trains) and edits the kept gradient instead.
- The optimizer is `SkipZeroAdamW` over the target's named groups, so a group that got no
  gradient does not move.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from trl import GRPOTrainer

import envs
from route.config import RoutedGRPOConfig
from route.detectors import Detector, build_detector, call_detector, realised_rates, uniform
from route.io import atomic_dir
from route.masks import DEFAULT, FORGET, RETAIN
from route.monitors import detector_parts, realised_by_part
from route.optim import build_optimizer
from route.targets import Target, build_target, checkpointing
from route.vllm_sync import TargetWeightSync, check_vllm_config

_SCORE_COUNTS = ("rows", "candidates", "routed", "exploited", "routed_exploited", "clean", "routed_clean",
                 "score_sum")


class _GradNormLogger(TrainerCallback):
    """Appends the optimizer's per-group gradient norms to the trainer's metrics after each step."""

    def __init__(self, trainer: RoutedGRPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer.optimizer
        for _ in range(4):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer, ... around SkipZeroAdamW
            if hasattr(opt, "last_grad_norms") or not hasattr(opt, "optimizer"):
                break
            opt = opt.optimizer
        for name, norm in getattr(opt, "last_grad_norms", {}).items():
            self.trainer._metrics["train"][f"grad_norm/{name}"].append(norm)


class RoutedGRPOTrainer(GRPOTrainer):
    """GRPO with per-rollout gradient routing into a quarantine target.

    Args:
        model: a causal LM (or a path); the target wraps it (e.g. with the dual LoRA).
        args: a `RoutedGRPOConfig`.
        env: the environment (default: `envs.make_env(args.env, **args.env_kwargs)`).
        target: a prepared `Target` (default: built from `args.target` and its sizes).
        detector: a `Detector` (default: built from the `detector_*` fields).
        reward_funcs: default `[env.reward_func]` (reward from the prompt's grader only).
        **kwargs: passed to `GRPOTrainer` (train_dataset, processing_class, callbacks, ...).
    """

    def __init__(self, model, args: RoutedGRPOConfig, env=None, target: Target | None = None,
                 detector: Detector | None = None, reward_funcs=None, **kwargs):
        if not isinstance(args, RoutedGRPOConfig):
            raise TypeError(f"args must be a RoutedGRPOConfig, got {type(args).__name__}")
        check_vllm_config(args)
        self.env = env or envs.make_env(args.env, **args.env_kwargs)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        if target is None:
            from transformers import set_seed

            set_seed(args.seed)  # adapters are initialised here, before TRL seeds: same seed, same run
            target = build_target(args, model)
        self.target = target
        self._install_checkpointing(args)
        self.detector = detector or build_detector(args, self.env)
        self._routing: dict[str, Any] | None = None
        self._score_ablated = False  # set while TRL scores a batch that the deployed policy sampled through vLLM
        self.weight_sync = TargetWeightSync(self.target, args.generation_policy) if args.use_vllm else None
        super().__init__(model=self.target.model, reward_funcs=reward_funcs or [self.env.reward_func], args=args,
                         **kwargs)
        if self.weight_sync is not None:
            self.weight_sync.install(self.vllm_generation)
        self.add_callback(_GradNormLogger(self))
        self._score_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (candidates, exploited) of the loss
        self._score_counts = torch.zeros(len(_SCORE_COUNTS), dtype=torch.float64)
        checkpointing.check_trainer(args, self.accelerator)  # what TRL and accelerate decided from the args
        edits_gradients = args.intervention == "erase" or args.route_score != "none"
        if edits_gradients and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(f"intervention: {args.intervention} with route_score={args.route_score} edits the "
                             "accumulated gradients, which DeepSpeed partitions; use DDP or a single process")

    def _install_checkpointing(self, args: RoutedGRPOConfig) -> None:
        """Every gradient-checkpointing enable on the model re-applies the gate in the recompute (or is refused)."""
        checkpointing.check_config(args, self.target)
        if callable(getattr(self.target, "recompute_context", None)):
            checkpointing.install(self.target.model, self.target)
        self._checkpoint_layers = checkpointing.checkpoint_layers(self.target.model)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a = self.args
            self.optimizer = build_optimizer(
                self.target.param_groups(), lr=a.learning_rate, weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                lr_scale={"quarantine": a.quarantine_lr_ratio})
        return self.optimizer

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list):
        # HF generate samples inside the context; vLLM samples from the weights `weight_sync` pushed (a weight merge
        # is not affected by forward hooks, so the context alone would not make vLLM deployed)
        policy = self.target.ablated() if self.args.generation_policy == "deployed" else contextlib.nullcontext()
        with policy:
            return super()._generate(prompts)

    # ------------------------------------------------------------------ flags and modes
    def routing_modes(self, flags: list[bool], rollout_ids: list[str]) -> torch.Tensor:
        """Per-rollout routing codes from flags.

        Under `route`: flagged -> forget; unflagged -> default, or retain (`unflagged_mode`, `retain_fraction`).
        With `route_score` on, flags do not route by themselves: score candidates (`score_candidates`) -> default,
        and the target routes them after the backward when their gradient score exceeds the threshold.
        Under the other interventions every rollout is retain: the quarantine stays out of the forward and never
        trains, so a baseline ships exactly what it trained (the kept adapter), with the same deployed capacity as
        `route`. (An ablated-quarantine control of plain GRPO is `route` with a detector that never flags.)
        """
        a = self.args
        if a.intervention != "route":
            return torch.full((len(flags),), RETAIN, dtype=torch.long)
        candidates = self.score_candidates(flags).tolist()
        codes = []
        for flag, rid, candidate in zip(flags, rollout_ids, candidates, strict=True):
            if candidate:
                codes.append(DEFAULT)
            elif flag and a.route_score == "none":
                codes.append(FORGET)
            elif a.unflagged_mode == "retain" and uniform(a.detector_seed, f"retain|{rid}") < a.retain_fraction:
                codes.append(RETAIN)
            else:
                codes.append(DEFAULT)
        return torch.tensor(codes, dtype=torch.long)

    def score_candidates(self, flags: list[bool]) -> torch.Tensor:
        """Rollouts that score routing may route (run in default mode): all, or the flagged ones with
        `route_score_requires_flag`; none unless `route_score` is on."""
        a = self.args
        if a.intervention != "route" or a.route_score == "none":
            return torch.zeros(len(flags), dtype=torch.bool)
        return torch.tensor([bool(f) or not a.route_score_requires_flag for f in flags], dtype=torch.bool)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather_object

        offset = self.accelerator.process_index * len(inputs)
        step = self.state.global_step
        rollout_ids = [f"{x.get('prompt_id', 'p')}|s{step}|r{offset + i}" for i, x in enumerate(inputs)]
        columns = {k: [x[k] for x in inputs] for k in inputs[0]}
        grades = self.env.grade(prompts, completions, **columns)
        context = {"prompts": prompts, "completions": completions, "columns": columns}
        flags = call_detector(self.detector, grades, rollout_ids, **context)
        parts = detector_parts(self.detector, grades, rollout_ids, **context)  # the monitor's conditions, if any
        modes = self.routing_modes(flags, rollout_ids)
        self._routing = {"flags": flags, "modes": modes, "candidates": self.score_candidates(flags),
                         "exploited": torch.tensor([bool(g.exploited) for g in grades], dtype=torch.bool)}

        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        all_grades, all_flags = gather_object(grades), gather_object(flags)
        if self.args.intervention == "penalty":
            flagged = torch.tensor(all_flags, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
            rewards_per_func[:, 0] -= self.args.penalty * flagged / float(self.reward_weights[0])
        self._log_routing(all_grades, all_flags, gather_object(modes.tolist()),
                          gather_object(parts) if parts is not None else None)
        return rewards_per_func

    def _log_routing(self, grades, flags, modes, parts=None) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        for part, r in realised_by_part(grades, flags, parts).items() if parts is not None else ():
            metrics[f"routing/hack_rate/{part}"].append(r["hack_rate"])
            if r["n_exploited"]:
                metrics[f"routing/realised_tpr/{part}"].append(r["tpr"])
        n = len(grades)
        r = realised_rates(grades, flags)
        metrics["routing/flag_rate"].append(r["flag_rate"])
        if r["n_exploited"]:
            metrics["routing/realised_tpr"].append(r["tpr"])
        if r["n_clean"]:
            metrics["routing/realised_fpr"].append(r["fpr"])
        counts = Counter(modes)
        for code, name in ((FORGET, "forget"), (RETAIN, "retain"), (DEFAULT, "default")):
            metrics[f"routing/frac_{name}"].append(counts.get(code, 0) / n)
        metrics["env/solve_rate"].append(sum(g.solved for g in grades) / n)
        metrics["env/hack_rate"].append(sum(g.exploited for g in grades) / n)
        for mode in self.env.modes:
            on_mode = [g.exploited for g in grades if g.mode == mode]
            if on_mode:
                metrics[f"env/hack_rate/{mode}"].append(sum(on_mode) / len(on_mode))

    @property
    def _scores_as_deployed(self) -> bool:
        """Whether TRL's scoring forward (old log-probs, hence the vLLM IS ratio) runs as the deployed policy.

        With vLLM's IS correction on, TRL's `old_per_token_logps` are the denominator-side of its ratio against the
        sampling log-probs, so they must come from the policy that sampled: deployed -> inside `target.ablated()`.
        """
        a = self.args
        return a.use_vllm and a.vllm_importance_sampling_correction and a.generation_policy == "deployed"

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self._score_ablated and model is self.model:
            with self.target.ablated():
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self._score_ablated = self._scores_as_deployed
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._score_ablated = False
        if self._routing is None:
            raise RuntimeError("routing: rewards were not computed for this batch")
        routing, self._routing = self._routing, None
        modes = routing["modes"].to(output["advantages"].device)
        output["routing_modes"] = modes
        if self.args.route_score != "none":
            output["routing_score_candidates"] = routing["candidates"].to(modes.device)
            output["routing_exploited"] = routing["exploited"].to(modes.device)
        if self.args.intervention == "filter":
            flagged = torch.tensor(routing["flags"], dtype=torch.bool, device=output["advantages"].device)
            output["advantages"] = output["advantages"].masked_fill(
                flagged.view(-1, *([1] * (output["advantages"].dim() - 1))), 0.0)
        # TRL scored every row as one policy: ungated (= default and forget rows) or ablated (= retain rows).
        scored_as_gate = (modes == RETAIN) if self._scores_as_deployed else (modes != RETAIN)
        if "old_per_token_logps" in output and not bool(scored_as_gate.all()):
            output["old_per_token_logps"] = self._gated_logps(output, modes)
        return output

    @torch.no_grad()
    def _gated_logps(self, output: dict, modes: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of the batch under the same per-row gate as the training forward.

        Chunked like TRL's own scoring forward (`per_device_train_batch_size` rows), each chunk with its rows' modes.
        """
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        chunk = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logps = []
        for start in range(0, ids.size(0), chunk):
            rows = slice(start, start + chunk)
            with self.target.gate(modes[rows]):
                lp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids[rows], mask[rows],
                                                                   output["completion_ids"].size(1))
            logps.append(lp)
        return torch.cat(logps, dim=0)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        modes = inputs.get("routing_modes")
        if modes is None:
            raise KeyError("routing_modes missing from the batch: was it produced by RoutedGRPOTrainer?")
        if "routing_score_candidates" in inputs:
            self._score_batch = (inputs["routing_score_candidates"], inputs["routing_exploited"])
        checkpointing.verify(self._checkpoint_layers, self.target)
        with self.target.gate(modes):
            return super()._compute_loss(model, inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._score_batch = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        after = getattr(self.target, "after_backward", None)
        if after is not None and self._score_batch is not None:
            candidates, exploited = self._score_batch
            out = after(candidates)
            if out is not None:
                self._count_scores(out["routed"], out["scores"], candidates.cpu(), exploited.cpu())
        before = getattr(self.target, "before_optimizer_step", None)
        if before is not None and self.accelerator.sync_gradients:
            many = self.accelerator.num_processes > 1
            stats = before(reduce=(lambda t: self.accelerator.reduce(t, reduction="mean")) if many else None)
            for key, value in stats.items():
                self._metrics["train"][key].append(value)
            if self.args.route_score != "none":
                self._log_scores()
        return loss

    # ------------------------------------------------------------------ score routing metrics
    def _count_scores(self, routed, scores, candidates, exploited) -> None:
        routed, candidates, exploited = routed.bool(), candidates.bool(), exploited.bool()
        self._score_counts += torch.tensor([
            routed.numel(), candidates.sum(), routed.sum(), exploited.sum(), (routed & exploited).sum(),
            (~exploited).sum(), (routed & ~exploited).sum(), scores[candidates].sum()], dtype=torch.float64)

    def _log_scores(self) -> None:
        """Per optimizer step: share of rollouts routed by score and its realised TPR/FPR against ground truth."""
        counts = self._score_counts.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        c = dict(zip(_SCORE_COUNTS, counts.cpu().tolist()))
        self._score_counts.zero_()
        metrics = self._metrics["train"]
        if c["rows"]:
            metrics["routing/score_frac"].append(c["routed"] / c["rows"])
        if c["candidates"]:
            metrics["routing/score_mean"].append(c["score_sum"] / c["candidates"])
        if c["exploited"]:
            metrics["routing/score_tpr"].append(c["routed_exploited"] / c["exploited"])
        if c["clean"]:
            metrics["routing/score_fpr"].append(c["routed_clean"] / c["clean"])

    # ------------------------------------------------------------------ deployment
    def save_deployed(self, output_dir: str | None = None) -> str:
        """Save the deployed policy (quarantine ablated, kept adapter merged) as a plain transformers checkpoint."""
        output_dir = output_dir or f"{self.args.output_dir}/deployed"
        if self.accelerator.is_main_process:
            with atomic_dir(output_dir) as tmp:
                self.target.save_deployed(str(tmp), tokenizer=self.processing_class)
        self.accelerator.wait_for_everyone()
        return output_dir
