"""The coding environment plugs into RoutedGRPOTrainer like the toy one (one step, sandboxed grading): the logged rates
are those of the sandbox's grades of the step's completions, and flagged rollouts are routed."""

from tests.test_trainer import make_trainer


def test_one_routed_step_on_coding(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, env="coding", env_kwargs={"hack_frac": 0.5, "workers": 2},
                     max_steps=1, detector_fpr=0.5, train_size=16)
    assert t.env.name == "coding"
    graded = []
    grade = t.env.grade

    def recording(prompts, completions, **columns):
        out = grade(prompts, completions, **columns)
        graded.append((list(prompts), list(completions), columns, out))
        return out

    t.env.grade = recording
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert t.state.global_step == 1 and len(logged) == 1
    assert len(graded) == 2, "the reward function and the trainer's grades (kept out of the reward) each grade once"
    assert graded[0][1] == graded[1][1] and graded[0][3] == graded[1][3], "the same completions, the same grades"
    prompts, completions, columns, grades = graded[-1]
    assert all("def " in p for p in prompts)
    n = len(grades)
    assert n == len(completions) == t.args.per_device_train_batch_size
    assert logged[0]["env/hack_rate"] == sum(g.exploited for g in grades) / n
    assert logged[0]["env/solve_rate"] == sum(g.solved for g in grades) / n
    assert logged[0]["routing/frac_forget"] == logged[0]["routing/flag_rate"] > 0, "flagged rollouts are routed"
    assert grade(prompts, completions, **columns) == grades, "the sandboxed grades are a pure function of the rollouts"
