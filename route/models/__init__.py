"""Models and their evaluation: the CPU model organism and the shipped organisms (`organism`, `organisms/`),
pretrained models from GGUF files (`pretrained`), model-argument checks (`paths`), hack/solve rates of a model
(`evaluate`), and the model families that share the masks core: SGTM (`sgtm`), tiered models (`tiered`),
alignment heads (`heads`). May import route.utils, route.masks, route.monitors (and envs); nothing above."""
