"""Experiment tooling on top of the library, reading and writing run directories: sweeps (`sweep`, `sweep_spec`,
`sweep_plots`), selection and its reports (`selection`, `selection_probes`, `selection_organisms`,
`selection_plots`, `compare`, `pareto`, `report`), relearn probes (`relearn`), hack-subspace extraction
(`vhack`), and the `route evaluate` command (`evaluate`). May import every layer below, the main job
(route.train_grpo) included; not route.cli."""
