"""Try the newest TRL: install it into a scratch venv, run the trainer's tests, diff the TRL internals route uses.

    python scripts/check_trl.py                       # newest TRL on the package index
    python scripts/check_trl.py --trl 1.17.0 --tests tests/test_trainer.py
    python scripts/check_trl.py --python /path/to/other/python --skip-tests   # an interpreter you already have

Not part of CI (it installs from the package index). Steps:

1. a scratch venv (`--venv`, default /tmp/route-trl-check) with `--system-site-packages`, so torch and the
   rest are reused from the current environment; `pip install --upgrade trl` (or `trl==--trl`) inside it;
2. `pytest` on the trainer's tests (`--tests`) with that venv's Python and this checkout on PYTHONPATH;
3. for every TRL method `route` overrides or calls by its private name (the methods of `RoutedGRPOTrainer` that
   `GRPOTrainer` also defines, the `_names` route/trainer/trainer.py calls on it, and the vLLM weight-sync internals
   route/vllm/sync.py replaces), `inspect.signature` under the installed TRL and under the new one: each line
   says `same`, `SIGNATURE CHANGED`, `source changed` (same signature, different body) or `MISSING`.

Exit status: 0 when the tests pass and no signature changed or went missing, else 1.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_trainer.py", "tests/test_vllm.py", "tests/test_resume.py"]
# TRL internals outside GRPOTrainer that route replaces or calls (route/vllm/sync.py, route/trainer/logprobs.py)
EXTRA = [
    "trl.generation.vllm_generation:VLLMGeneration.sync_weights",
    "trl.generation.vllm_generation:VLLMGeneration._iter_named_params",
    "trl.trainer.utils:add_fused_lm_head",
    "trl.trainer.utils:FusedCausalLMOutput",
]


def watched_names() -> list[str]:
    """`module:qualname` of every TRL method route overrides or calls by a private name (this environment)."""
    sys.path.insert(0, str(ROOT))  # this checkout's route
    from trl import GRPOTrainer

    from route.trainer.trainer import RoutedGRPOTrainer

    names = {n for n, v in vars(RoutedGRPOTrainer).items() if callable(v) and hasattr(GRPOTrainer, n)}
    source = (ROOT / "route" / "trainer" / "trainer.py").read_text()
    names |= {n for n in re.findall(r"\.(_[a-z]\w*)\(", source) if hasattr(GRPOTrainer, n)}
    return [f"trl:GRPOTrainer.{n}" for n in sorted(names - {"__init__"}) + ["__init__"]] + EXTRA


def describe(names: list[str]) -> dict:
    """{name: {signature, source sha256}} in this interpreter (None for a name it lacks), and TRL's version."""
    import importlib

    import trl

    out = {}
    for name in names:
        module, qualname = name.split(":")
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            out[name] = None
            continue
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(no signature)"
        try:
            src = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]
        except (OSError, TypeError):
            src = None
        out[name] = {"signature": sig, "source": src}
    return {"trl": trl.__version__, "names": out}


def run_describe(python: str, names: list[str]) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.check_trl import describe; "
    code += f"print(json.dumps(describe({names!r})))"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(old: dict, new: dict) -> tuple[list[str], bool]:
    """Printable lines and whether anything breaks (a changed or missing signature)."""
    lines, broken = [], False
    width = max(map(len, old["names"]))
    for name, before in old["names"].items():
        after = new["names"].get(name)
        if after is None:
            status, broken = "MISSING", True
        elif before is None:
            status = "new in this TRL (absent before)"
        elif after["signature"] != before["signature"]:
            status, broken = f"SIGNATURE CHANGED: {before['signature']} -> {after['signature']}", True
        elif after["source"] != before["source"]:
            status = "source changed (same signature)"
        else:
            status = "same"
        lines.append(f"  {name:<{width}}  {status}")
    return lines, broken


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default="/tmp/route-trl-check", help="scratch venv (default: /tmp/route-trl-check)")
    p.add_argument("--trl", default=None, help="TRL version to install (default: the newest on the index)")
    p.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help=f"pytest paths (default: {DEFAULT_TESTS})")
    p.add_argument("--skip-tests", action="store_true", help="only compare signatures")
    p.add_argument(
        "--python",
        default=None,
        help="compare against the TRL this interpreter has (no venv, nothing installed; --venv, --trl unused)",
    )
    args = p.parse_args(argv)
    if args.python:
        python, where = args.python, args.python
    else:
        env_dir = Path(args.venv)
        python, where = str(env_dir / "bin" / "python"), str(env_dir)
        if not Path(python).exists():
            print(f"creating {env_dir} (--system-site-packages)", flush=True)
            venv.create(env_dir, system_site_packages=True, with_pip=True)
        spec = f"trl=={args.trl}" if args.trl else "trl"
        subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", spec], check=True)
    names = watched_names()
    old, new = describe(names), run_describe(python, names)  # this interpreter in this process, the other in its own
    print(f"TRL installed here: {old['trl']}; in {where}: {new['trl']}")
    rc = 0
    if not args.skip_tests:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        print(f"pytest {' '.join(args.tests)} under TRL {new['trl']} ...", flush=True)
        tests = subprocess.run(
            [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:warnings", *args.tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = [line for line in tests.stdout.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b", line)]
        print("  " + (summary or tests.stdout.strip().splitlines() or ["(no output)"])[-1])
        rc = tests.returncode
    lines, broken = compare(old, new)
    print(f"TRL methods route overrides or calls privately ({len(lines)}), {old['trl']} -> {new['trl']}:")
    print("\n".join(lines))
    return 1 if rc or broken else 0


if __name__ == "__main__":
    sys.exit(main())
