"""The coding environment plugs into RoutedGRPOTrainer like the toy one (one step, sandboxed grading)."""

from tests.test_trainer import make_trainer


def test_one_routed_step_on_coding(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, env="coding", env_kwargs={"hack_frac": 0.5, "workers": 2},
                     max_steps=1, detector_fpr=0.5, train_size=16)
    assert t.env.name == "coding"
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert t.state.global_step == 1 and len(logged) == 1
    assert 0.0 <= logged[0]["env/hack_rate"] <= 1.0 and "routing/frac_forget" in logged[0]
