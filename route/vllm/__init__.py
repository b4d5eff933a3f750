"""vLLM generation for a quarantine target: the weight sync through TRL's `VLLMGeneration` (`sync`) and the
server-mode weight push (`serve`). The real `vllm` package is always imported by its absolute name. May import
route.utils, route.masks, route.monitors, route.models, route.targets; nothing above."""
