"""Do the portable kernels give the same bits on another CPU? Runs the same work here and on an emulated Intel CPU.

    python scripts/check_portable.py                        # a kernel fingerprint, here and emulated (~2 minutes)
    python scripts/check_portable.py --job --max_steps 30 --eval_n 128 --val_n 128   # the main job, both ways

The other CPU is `qemu-x86_64 -cpu Haswell` (Debian's `qemu-user`): user-mode emulation of an Intel CPU with AVX2
and FMA (no AVX-512), so MKL and ATen pick their code paths from an Intel CPUID while the arithmetic is IEEE-exact.
What it cannot stand in for is an instruction whose result the vendor defines (the approximate reciprocal and
square-root instructions): where the emulated and the real CPU agree bit for bit, the work used none, so another
real Intel or AMD CPU agrees too. The fingerprint hashes what a routed GRPO step runs: matrix products of several
shapes, MKL's vector math (exp, log), softmax, attention, five steps of a tiny Llama with the project's optimizer,
and sampled generation. `--job` runs `route/train_grpo.py` with the given flags both ways and compares results.json's
rates and every tensor of the saved policy and deployed checkpoint. Exit status 1 when anything differs.
`ROUTE_KERNELS=native python scripts/check_portable.py` shows what the portable mode removes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ["qemu-x86_64", "-cpu", "Haswell"]


def fingerprint() -> dict[str, str]:
    """Hashes of the outputs of the kernels a routed GRPO step runs (this process's kernel choice)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import route  # noqa: F401  (chooses threads and kernels before torch runs anything)
    from route.masks.optim import build_optimizer

    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]

    g = torch.Generator().manual_seed(0)
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "kernels": os.environ.get("ROUTE_KERNELS", "")}
    for m, k, n in [(16, 128, 128), (7, 33, 129), (256, 256, 48), (8, 576, 1536)]:
        out[f"matmul {m}x{k}x{n}"] = h(torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g))
    x = torch.randn(50_000, generator=g)
    for name, fn in [("exp", torch.exp), ("log", lambda t: t.abs().log()), ("tanh", torch.tanh),
                     ("softmax", lambda t: t.view(50, -1).softmax(-1)), ("logsumexp", lambda t: t.view(50, -1)
                                                                         .logsumexp(-1))]:
        out[name] = h(fn(x))
    q = torch.randn(2, 4, 24, 32, generator=g)
    out["attention"] = h(torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                                         tie_word_embeddings=True))
    opt = build_optimizer({"keep": list(model.parameters())}, lr=3e-3)
    ids = torch.randint(0, 48, (8, 20), generator=g)
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    out["training (5 AdamW steps)"] = h(torch.cat([p.flatten() for p in model.parameters()]))
    torch.manual_seed(1)
    sampled = model.generate(ids[:4, :6], do_sample=True, max_new_tokens=10, pad_token_id=0)
    out["sampled tokens"] = hashlib.sha256(str(sampled.tolist()).encode()).hexdigest()[:12]
    return out


def run(cmd: list[str], emulated: bool, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    full = ([*EMULATOR, os.path.realpath(sys.executable)] if emulated else [sys.executable]) + cmd
    return subprocess.run(full, env=env, capture_output=True, text=True, **kw)


def check_fingerprints() -> bool:
    here, there = ({}, {})
    for emulated, into in ((False, here), (True, there)):
        out = run([__file__, "--fingerprint"], emulated)
        if out.returncode != 0:
            sys.exit(f"check_portable: the {'emulated' if emulated else 'native'} fingerprint failed:\n{out.stderr}")
        into.update(json.loads(out.stdout.strip().splitlines()[-1]))
    width = max(map(len, here))
    print(f"{'':{width}}  {'here':12}  {'emulated Intel (Haswell)':24}")
    same = True
    for key in here:
        ok = here[key] == there.get(key) or key == "capability"  # the CPUs' own: not a result
        same &= ok
        verdict = "(the CPU's)" if key == "capability" else "same" if ok else "DIFFERS"
        print(f"{key:{width}}  {here[key]:12}  {there.get(key, '-'):24}  {verdict}")
    return same


def tensors(run_dir: Path) -> dict[str, object]:
    import torch
    from safetensors.torch import load_file

    out = {f"policy/{k}": v for k, v in torch.load(run_dir / "policy" / "target_state.pt").items()}
    for f in sorted((run_dir / "deployed").glob("*.safetensors")):
        out.update({f"deployed/{k}": v for k, v in load_file(f).items()})
    return out


def check_job(flags: list[str]) -> bool:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="check_portable_"))
    try:
        dirs = {}
        for emulated in (False, True):
            d = dirs[emulated] = tmp / ("emulated" if emulated else "native")
            out = run([str(ROOT / "route" / "train_grpo.py"), *flags, "--output_dir", str(d), "--disable_tqdm", "true"],
                      emulated)
            if out.returncode != 0:
                where = "emulated" if emulated else "native"
                sys.exit(f"check_portable: the {where} job failed:\n{out.stderr[-3000:]}")
        a, b = (json.loads((dirs[e] / "results.json").read_text()) for e in (False, True))
        same = True
        for policy in ("base", "training", "deployed", "deployed_at_scale"):
            if policy in a or policy in b:
                ok = a.get(policy) == b.get(policy)
                same &= ok
                print(f"results.json {policy:18} {'same' if ok else 'DIFFERS'}")
        ta, tb = tensors(dirs[False]), tensors(dirs[True])
        differ = sorted(k for k in ta if k not in tb or not torch.equal(ta[k], tb[k]))
        print(f"tensors: {len(ta) - len(differ)} of {len(ta)} bit-identical" + (f"; differ: {differ[:5]}" if differ
                                                                                  else ""))
        return same and not differ and set(ta) == set(tb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="check_portable.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fingerprint", action="store_true", help="print this process's fingerprint (JSON) and exit")
    parser.add_argument("--job", action="store_true", help="compare the main job (the remaining flags are its flags)")
    args, rest = parser.parse_known_args(argv)
    if args.fingerprint:
        print(json.dumps(fingerprint()))
        return
    if shutil.which(EMULATOR[0]) is None:
        sys.exit(f"check_portable: {EMULATOR[0]} not found; install it: apt-get install -y qemu-user")
    same = check_job(rest) if args.job else check_fingerprints()
    print("same bits on both CPUs" if same else "the CPUs differ")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
