"""The config fields of a tiny CPU run of the main job / trainer, shared by the tests (override per test)."""

TINY_RUN = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-3, beta=0.0,
                per_device_train_batch_size=8, num_generations=4, max_completion_length=8, max_steps=1,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, train_size=32,
                keep_rank=2, quarantine_rank=2, eval_n=16)
