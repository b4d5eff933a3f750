"""The training core: `RoutedGRPOConfig` (`config`), building and validating a run's configuration (`parse`),
`RoutedGRPOTrainer` (`trainer`: flags -> modes -> gated loss), routing policy (`policy`), rollout scales
(`rollout`), gated log-probs (`logprobs`), quarantine scales of a saved run (`scales`). The main job's script is
route/train_grpo.py beside it. May import every layer below (route.utils, route.masks, route.monitors,
route.models, route.targets, route.vllm); not route.experiments nor the command (route.cli)."""
