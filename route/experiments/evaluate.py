"""`route evaluate`: solve and hack rates of a saved model on held-out prompts (`route.models.evaluate`), or of a
main-job run's training policy at quarantine scales (`--run`, `route.trainer.scales`)."""

from __future__ import annotations

import envs
from route.models.evaluate import evaluate_dir, format_rates
from route.models.paths import check_model_path
from route.utils.errors import ArgumentParser, at_least, cli, looks_local, naming
from route.utils.io import write_json_atomic


@cli("route evaluate")
def main(argv: list[str] | None = None) -> None:
    from route.trainer.scales import add_arguments, run_cli

    parser = ArgumentParser(prog="route evaluate", description="Solve and hack rates of a saved model on held-out "
                            "prompts, or of a main-job run's training policy at quarantine scales (--run).")
    parser.add_argument("--model", help="a saved checkpoint directory, a run directory with deployed/, or a Hub id "
                        "(org/name); or give --run (default: none)")
    parser.add_argument("--env", default="arith", choices=envs.available_envs(), help="environment")
    parser.add_argument("--n", type=int, default=None, help="number of held-out prompts (default 512; with --run the "
                        "run's eval_n)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the held-out prompts and of sampling "
                        "(default 0; with --run the run's eval_seed)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="completion length")
    parser.add_argument("--json", help="write the rates to this file (default: none)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.n is not None:
        at_least("--n", args.n)
    at_least("--max_new_tokens", args.max_new_tokens)
    if (args.run is None) == (args.model is None):
        parser.error("--model / --run: give one of --model (a checkpoint) or --run (a main-job output directory)")
    if args.run is None and (args.scales or args.png):
        parser.error("--scales and --png need --run (a main-job output directory with policy/)")
    if args.run is not None:
        return run_cli(args)
    args.n = 512 if args.n is None else args.n
    args.seed = 0 if args.seed is None else args.seed
    check_model_path("--model", args.model, hub=True)  # a missing local path is not looked up on the Hub
    from route.models.pretrained import resolve_model

    args.model = resolve_model(args.model, flag="--model")
    with naming("--model"):
        if looks_local(args.model):
            from route.utils.io import check_checkpoint

            args.model = str(check_checkpoint(args.model))
        from transformers import AutoConfig

        AutoConfig.from_pretrained(args.model)  # a Hub model the loader cannot fetch: one line naming --model
    result = evaluate_dir(args.model, args.env, n=args.n, seed=args.seed, max_new_tokens=args.max_new_tokens)
    print(format_rates(result, title=str(args.model)))
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
