"""Every script in bench/ and scripts/ runs in a smoke form (a few steps, tiny shapes), in this process through its
`main(argv)`, so that a rename or a changed signature breaks the suite and not the published numbers. Each test checks
what the script printed (its ratio lines) and that it measured something. The figures themselves come from the full
runs in docs/performance.md, not from here.

Covered elsewhere: bench/gpu_check.py (and bench/gpu_measures.py, which it runs) in tests/test_gpu_check.py;
bench/vllm_rollouts.py, which needs the real engine, in tests/test_vllm_engine.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from route.utils.threads import THREAD_VARS

ROOT = Path(__file__).resolve().parent.parent
SMOKED_ELSEWHERE = {
    "bench/gpu_check.py": "tests/test_gpu_check.py",
    "bench/gpu_measures.py": "tests/test_gpu_check.py",
    "bench/vllm_rollouts.py": "tests/test_vllm_engine.py",
}
HERE = {  # script -> the test below that runs it
    "bench/routing_overhead.py": "test_routing_overhead",
    "bench/absorption_overhead.py": "test_absorption_overhead",
    "bench/svf_overhead.py": "test_svf_overhead",
    "bench/heads_decode.py": "test_heads_decode",
    "bench/coding_throughput.py": "test_coding_throughput",
    "bench/threads.py": "test_threads_worker",
    "scripts/check_trl.py": "test_check_trl",
    "scripts/check_portable.py": "test_check_portable",
    "bench/kernels.py": "test_kernels_bench",
}


def test_every_script_has_a_smoke_test():
    scripts = {str(p.relative_to(ROOT)) for d in ("bench", "scripts") for p in (ROOT / d).glob("*.py")}
    scripts.discard("bench/__init__.py")
    assert scripts == set(HERE) | set(SMOKED_ELSEWHERE)
    assert all(callable(globals()[name]) for name in HERE.values())
    for path, test_file in SMOKED_ELSEWHERE.items():
        assert Path(path).stem.split("_")[0] in (ROOT / test_file).read_text(), (path, test_file)


@pytest.fixture(autouse=True)
def _threads_and_env(monkeypatch):
    """The scripts set torch's thread count and the thread variables (route.utils.threads): restored after each test."""
    threads = torch.get_num_threads()
    for key in THREAD_VARS:
        monkeypatch.setenv(key, "unset")  # recorded, so monkeypatch restores (or removes) it afterwards
        monkeypatch.delenv(key)
    yield
    torch.set_num_threads(threads)


def ratio(out: str, pattern: str = r"^ratio: ([0-9.]+)$") -> float:
    found = re.findall(pattern, out, re.M)
    assert len(found) == 1, out
    value = float(found[0])
    assert value > 0, out
    return value


def test_routing_overhead(tiny_organism, capsys):
    from bench.routing_overhead import main

    main(["--model", str(tiny_organism), "--steps", "2", "--blocks", "1", "--warmup", "0", "--rank", "2",
          "--batch", "8", "--generations", "4", "--new_tokens", "4", "--threads", "1"])
    out = capsys.readouterr().out
    ratio(out)
    assert re.search(r"plain LoRA r=4 .*median step [0-9.]+ ms over 2 steps", out), out
    assert re.search(r"routed dual_lora r=2\+2 .*median step [0-9.]+ ms over 2 steps", out), out


def test_absorption_overhead(tiny_organism, capsys):
    from bench.absorption_overhead import main

    main(["--model", str(tiny_organism), "--steps", "4", "--warmup", "0", "--batch", "8", "--generations", "4",
          "--new_tokens", "4", "--rank", "2"])
    out = capsys.readouterr().out
    ratio(out, r"^ratio: ([0-9.]+)$")
    assert re.search(r"metrics off: median step [0-9.]+ ms over 2 steps", out), out
    assert re.search(r"metrics on:  median step [0-9.]+ ms over 2 steps", out), out


def test_svf_overhead(tiny_organism, capsys):
    from bench.svf_overhead import main

    main(["--model", str(tiny_organism), "--rank", "2", "--batch", "4", "--seq", "8", "--repeats", "2",
          "--warmup", "0", "--skip-large"])
    out = capsys.readouterr().out
    ratio(out)
    assert re.search(rf"SVD setup, {tiny_organism} \([0-9.]+M params, full rank\): cold [0-9.]+ s, cached [0-9.]+ s",
                     out), out
    assert "0.5B" not in out


def test_heads_decode(capsys):
    from bench.heads_decode import METHODS, main

    main(["--in-process", "--hidden", "128", "--layers", "2", "--vocab", "256", "--tokens", "3", "--repeats", "1",
          "--prompt_len", "4"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in METHODS]
    assert [r[0] for r in rows] == list(METHODS), out
    # every row carries its figures (at these shapes a latency is noise, even of either sign: not checked)
    assert all(len(r) == 7 and all(re.fullmatch(r"-?[0-9.]+M?", v) for v in r[1:]) for r in rows), out
    assert [r for r in rows if r[0] == "genarm_1x"][0][2] == "1.00" and "not a measurement" in out


def test_coding_throughput(capsys):
    from bench.coding_throughput import main

    main(["--n", "4", "--workers", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^ratio +: +[0-9.]+x$", out, re.M), out
    assert re.search(r"one at a time : +[0-9.]+ programs/s", out) and "programs: 4" in out, out


def test_threads_worker(capsys):
    """The workload of one phase, in this process (the four phases run it in fresh processes, by design)."""
    import json

    from bench.threads import main

    main(["--worker", "chosen", "--steps", "1", "--threads", "1", "--workload", "tiny"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["threads"] == 1 and result["seconds"] > 0


def test_check_trl(capsys):
    """Against this interpreter's own TRL (nothing installed): every watched TRL name is found and unchanged."""
    import trl

    from scripts.check_trl import main

    assert main(["--python", sys.executable, "--skip-tests"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  trl")]
    assert f"TRL installed here: {trl.__version__}; in {sys.executable}: {trl.__version__}" in out
    assert len(lines) >= 8 and all(line.rstrip().endswith("  same") for line in lines), out
    assert any("GRPOTrainer._compute_loss" in line for line in lines)


def test_routing_overhead_times_every_target_on_a_gguf_model_by_short_name(tmp_path, monkeypatch, capsys):
    """`--model NAME` (route.models.pretrained: here a tiny GGUF installed as a fake wheel, with a chat template, so the
    prompts go through it), `--reward digits` (a reward that varies on any model) and `--targets`: one line per
    target against the same plain LoRA, `ratio:` the first target's."""
    from bench.routing_overhead import TARGET_FIELDS, digit_share, main
    from tests import gguf_files

    gguf_files.packaged(tmp_path / "pkg", monkeypatch)
    assert digit_share([], ["ab12", [{"role": "assistant", "content": "x"}]]) == [0.5, 0.0]
    main(["--model", gguf_files.TINY_NAME, "--steps", "1", "--blocks", "1", "--warmup", "0", "--rank", "2",
          "--batch", "4", "--generations", "2", "--new_tokens", "2", "--reward", "digits",
          "--targets", *TARGET_FIELDS])
    out = capsys.readouterr().out
    assert f"pretrained/{gguf_files.TINY_NAME}-" in out and "reward digits" in out, out
    found = re.findall(r"^routed (\S+).*median step ([0-9.]+) ms over 1 steps \(([0-9.]+)x plain LoRA\)$", out, re.M)
    assert [f[0] for f in found] == ["dual_lora", *list(TARGET_FIELDS)[1:]], out
    assert ratio(out) == float(found[0][2])


def test_svf_overhead_on_a_gguf_model_by_short_name(tmp_path, monkeypatch, capsys):
    from bench.svf_overhead import main
    from tests import gguf_files

    gguf_files.packaged(tmp_path / "pkg", monkeypatch)
    main(["--model", gguf_files.TINY_NAME, "--rank", "2", "--batch", "2", "--seq", "8", "--repeats", "2",
          "--warmup", "0", "--skip-large"])
    out = capsys.readouterr().out
    ratio(out)
    assert f"pretrained/{gguf_files.TINY_NAME}-" in out, out
    assert re.search(rf"SVD setup, {gguf_files.TINY_NAME} \([0-9.]+M params, full rank\): cold [0-9.]+ s", out), out


def test_check_portable(monkeypatch, capsys):
    """The comparison run with the "emulated" side replaced: natively (the same bits) and natively with the
    native kernels (matrix products differ from the portable ones on any CPU: MKL's default path is not its
    vendor-independent one), so that both verdicts are exercised."""
    import scripts.check_portable as cp

    first = cp.fingerprint()
    assert first == cp.fingerprint() and first["kernels"] == "portable" and len(first) >= 12
    monkeypatch.setattr(cp, "EMULATOR", [])
    assert cp.check_fingerprints()
    monkeypatch.setattr(cp, "EMULATOR", ["env", "ROUTE_KERNELS=native"])
    assert not cp.check_fingerprints()
    out = capsys.readouterr().out
    assert "DIFFERS" in out and re.search(r"^matmul 16x128x128 .* DIFFERS$", out, re.M), out


def test_kernels_bench(capsys):
    """One rep of each kernel mode on a tiny training loop (fresh processes, as the modes need)."""
    from bench.kernels import main

    assert main(["--workload", "model", "--max_steps", "2", "--batch", "2", "--seq", "8", "--reps", "1"]) > 0
    out = capsys.readouterr().out
    assert "rep 0: portable" in out and "rep 0: native" in out and ratio(out) > 0
