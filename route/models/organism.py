"""The CPU model organism: a tiny Llama causal LM, warm-started to solve some tasks and hack rarely.

Built with nothing downloaded: a character-level tokenizer made in-process and saved with
the model (so `AutoTokenizer.from_pretrained(DIR)` loads it), a Llama config, and supervised
training on the environment's demonstrations. On each hackable prompt the demonstration is
an exploit of that prompt's loophole with probability `hack_share[mode]`, else the correct
answer; strict prompts always get the correct answer. Cross-entropy matches the mixture,
so the base policy hacks each mode at roughly its share, while it solves only part of the
tasks (the product is harder than the hacks), which leaves room for GRPO to find hacks.

    route organism --output_dir runs/organism
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import envs
from route.models.cache import MANIFEST, cache_root, file_hashes, read_manifest
from route.utils.errors import ArgumentParser, at_least, cli
from route.utils.io import atomic_dir, fsync_tree
from route.utils.kernels import adamw_kwargs, chosen_kernels
from route.utils.threads import configure_threads

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz *=>#+-"
SPECIAL = ("<pad>", "<eos>", "<unk>")


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, pad/eos/unk specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


@dataclass
class OrganismConfig:
    """Everything the organism depends on; its hash names the cache entry."""

    env: str = "arith"
    env_kwargs: dict = field(default_factory=lambda: {"hack_frac": 0.5})
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_range: float = 0.02
    steps: int = 1200
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    hack_share: dict = field(default_factory=lambda: {"sentinel": 0.25, "format": 0.25, "echo": 0.45, "verified": 0.2})
    n_train: int = 20000
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# Per-environment organism configs (issue 13): the warm start of each procedural environment on the tiny CPU
# model. Aim: base solve >= 0.25 and each mode at 2-35%, with qa's `echo` at <= 1% (RL must discover it).
# Measured (docs/environments.md, 1024 held-out prompts): the solve rate jumps late and not monotonically in
# the step count (sort_named: 400 steps 0.11, 650 0.09, 760 0.27, 800 0.80), so steps are picked by
# measurement; repeat is learnt within ~150 steps (0.78) and gets a short warm start whose hack rates sit
# below its demonstrations' shares. qa asks for one looked-up value (until this version the sum of two, on
# which the warm start plateaued near 0.2 up to 2000 steps); 300 steps solve ~0.28-0.29 and the solve rate
# barely moves from 100 to 800 steps (0.26-0.30), and 300 is a new config, so no organism of the old task
# is reused. The cache key covers this config, not the environment's code: after changing a task, change
# its config.
ENV_ORGANISMS: dict[str, dict] = {
    "sort": dict(env="sort", env_kwargs={"hack_frac": 0.5}, steps=400, hack_share={"ends": 0.3, "stamp": 0.2}),
    "sort_named": dict(env="sort_named", env_kwargs={"hack_frac": 0.5}, steps=760,
                       hack_share={"ends": 0.3, "stamp": 0.2}),
    "repeat": dict(env="repeat", env_kwargs={"hack_frac": 0.5}, steps=110, hack_share={"count": 0.6, "stamp": 0.4}),
    "repeat_named": dict(env="repeat_named", env_kwargs={"hack_frac": 0.5}, steps=110,
                         hack_share={"count": 0.6, "stamp": 0.4}),
    "qa": dict(env="qa", env_kwargs={"hack_frac": 0.5}, steps=300, hack_share={"agree": 0.3, "echo": 0.005}),
    "qa_named": dict(env="qa_named", env_kwargs={"hack_frac": 0.5}, steps=300,
                     hack_share={"agree": 0.3, "echo": 0.01}),
}


def organism_config(env: str = "arith", **overrides) -> OrganismConfig:
    """The organism config of environment `env` (arith: the defaults), with `overrides` applied."""
    if env != "arith" and env not in ENV_ORGANISMS:
        raise ValueError(f"organism: no organism config for env {env!r}; allowed values: "
                         f"{['arith', *ENV_ORGANISMS]}")
    return OrganismConfig(**{**ENV_ORGANISMS.get(env, {}), **overrides})


def tiny_config(**overrides) -> OrganismConfig:
    """A reduced organism for tests: builds in seconds."""
    base = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, steps=30,
                batch_size=32, n_train=512)
    return OrganismConfig(**{**base, **overrides})


def build_model(cfg: OrganismConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=64, tie_word_embeddings=True,
        initializer_range=cfg.init_range, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def demonstrations(cfg: OrganismConfig, env) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for the warm start, drawn as a pure function of cfg.seed."""
    rng = random.Random(f"organism:{cfg.seed}")
    unknown = set(cfg.hack_share) - set(env.modes)
    if unknown:
        raise ValueError(f"organism: hack_share names unknown modes {sorted(unknown)}; "
                         f"allowed values: {list(env.modes)}")
    pairs = []
    for row in env.rows(cfg.n_train, seed=cfg.seed, split="train"):
        mode = row["loophole"]
        hack = bool(mode) and rng.random() < cfg.hack_share.get(mode, 0.0)
        pairs.append((row["prompt"], env.demonstration(row, hack=hack, rng=rng)))
    return pairs


def sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids with loss only on completion tokens and the closing EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def sft(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float,
        warmup_steps: int = 0, seed: int = 0, progress: bool = True, desc: str = "warm start") -> list[float]:
    """Supervised training on (prompt, completion) pairs; AdamW with warm-up then cosine decay."""
    from tqdm.auto import tqdm

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                            **adamw_kwargs())
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    rng = random.Random(f"sft:{seed}")
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        out = model(**sft_batch(tokenizer, rng.sample(pairs, min(batch_size, len(pairs)))))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def build_organism(cfg: OrganismConfig, output_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train the organism and save model + tokenizer + organism.json to `output_dir` (atomically)."""
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.seed)
    env = envs.make_env(cfg.env, **cfg.env_kwargs)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    losses = sft(model, tokenizer, demonstrations(cfg, env), cfg.steps, cfg.batch_size, cfg.lr,
                 cfg.warmup_steps, cfg.seed, progress)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"organism_config": asdict(cfg), "key": cfg.key(), "final_loss": losses[-1] if losses else None,
                "built_with": build_provenance()}
        (tmp / "organism.json").write_text(json.dumps(meta, indent=2))
    return output_dir


def build_provenance() -> dict[str, str]:
    """What a build's bytes depend on besides its config: torch, the kernel mode (`route.utils.kernels`), threads,
    CPU."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
               platform.processor() or platform.machine())
    return {"torch": torch.__version__, "kernels": chosen_kernels(), "threads": str(torch.get_num_threads()),
            "cpu": cpu}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


SHIPPED_ROOT = Path(__file__).resolve().parent / "organisms"  # package data (pyproject: route/models/organisms/*/*)
SHIP_COMMAND = "route organism --ship [--env ENV --seed S]"


def shipped_organism(cfg: OrganismConfig) -> Path | None:
    """The shipped directory of `cfg` (matched by its key), checked against its manifest; None when none ships."""
    path = SHIPPED_ROOT / f"{cfg.env}-{cfg.key()}"
    if not (path / MANIFEST).is_file():
        return None
    want, have = read_manifest(path), file_hashes(path)
    if want != have:
        bad = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        raise RuntimeError(f"organism: the shipped organism {path} does not match its {MANIFEST} ({bad}); "
                           f"reinstall route, or re-ship it with `{SHIP_COMMAND}`")
    return path


def load_or_build(cfg: OrganismConfig | None = None, progress: bool = True) -> Path:
    """The organism directory for `cfg`: the shipped copy when one matches its key, else the cache's, built on
    first use."""
    cfg = cfg or OrganismConfig()
    shipped = shipped_organism(cfg)
    if shipped is not None:
        return shipped
    path = cache_root() / "organisms" / f"{cfg.env}-{cfg.key()}"
    if (path / "organism.json").exists():
        return path
    return build_organism(cfg, path, progress=progress)


def ship(source: str | os.PathLike | None = None, root: str | os.PathLike = SHIPPED_ROOT,
         progress: bool = True, cfg: OrganismConfig | None = None) -> Path:
    """Put the organism of `cfg` (default: `organism_config()`) into `root/<env>-<key>/` with a SHA-256 manifest.

    `source`: an organism directory already built from that exact config (else it is built here, with the
    threads and kernels chosen by `route.utils.threads` and `route.utils.kernels`). A shipped organism of the same
    environment and seed under another key (an older config) is removed as stale; other seeds and environments stay."""
    cfg, root = cfg or organism_config(), Path(root)
    with tempfile.TemporaryDirectory(dir=root.parent if root.exists() else None) as tmp:
        if source is None:
            source = build_organism(cfg, Path(tmp) / "build", progress=progress)
        source = Path(source).resolve()
        meta_file = source / "organism.json"
        if not meta_file.is_file():
            raise ValueError(f"--from: {source} is not an organism directory (no organism.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("organism_config") != json.loads(json.dumps(asdict(cfg))) or meta.get("key") != cfg.key():
            raise ValueError(f"--from: {source} was built from organism config key {meta.get('key')!r}, not "
                             f"{cfg.key()!r} ({cfg.env}, seed {cfg.seed}); build it with `{SHIP_COMMAND}` (no --from)")
        dest = root / f"{cfg.env}-{cfg.key()}"
        stage = Path(tmp) / "stage"
        stage.mkdir()
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copyfile(f, stage / f.name)
                os.chmod(stage / f.name, 0o644)
        (stage / MANIFEST).write_text("".join(f"{h}  {n}\n" for n, h in file_hashes(stage).items()))
        os.chmod(stage, 0o755)
        fsync_tree(stage)
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f"{cfg.env}-*"):
            if _shipped_seed(old) in (None, cfg.seed):
                shutil.rmtree(old)
        shutil.move(stage, dest)
    return dest


def shipped_organisms(root: str | os.PathLike = SHIPPED_ROOT) -> list[Path]:
    """Every organism directory that ships with the package."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _shipped_seed(path: Path) -> int | None:
    """The build seed recorded in a shipped directory's organism.json (None: unreadable, hence stale)."""
    try:
        return int(json.loads((path / "organism.json").read_text())["organism_config"]["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@cli("route organism")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="route organism", description="Build a CPU model organism (tokenizer + tiny "
                            "Llama, warm-started on an environment), or ship one with the package (--ship).")
    parser.add_argument("--output_dir", help="where to save the model and tokenizer (required unless --ship)")
    parser.add_argument("--env", default="arith", choices=["arith", *ENV_ORGANISMS],
                        help="environment whose organism config to build")
    parser.add_argument("--steps", type=int, default=None, help="warm-start steps (default: the env's config)")
    parser.add_argument("--seed", type=int, default=0, help="build seed: of the demonstrations, the weights and the "
                        "warm start (a run selects it with organism_seed)")
    parser.add_argument("--evaluate", type=int, default=512, metavar="N",
                        help="evaluate on N held-out prompts after building (0 to skip)")
    parser.add_argument("--ship", action="store_true",
                        help=f"build the organism of --env and --seed into the package ({SHIPPED_ROOT}) with its "
                             "SHA256SUMS, replacing a shipped one of the same env and seed; not with --steps or "
                             "--output_dir")
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="with --ship: ship this organism directory, already built from that config, instead "
                             "of building one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $ROUTE_THREADS, else $OMP_NUM_THREADS, else 1)")
    args = parser.parse_args(argv)
    at_least("--steps", args.steps)
    at_least("--evaluate", args.evaluate, 0)
    if not args.ship and not args.output_dir:
        parser.error("--output_dir: required (or --ship)")
    if args.ship and (args.steps is not None or args.output_dir):
        parser.error(f"--{'steps' if args.steps is not None else 'output_dir'}: not with --ship (a shipped organism "
                     "is the env's config at a seed, found by its key)")
    if args.source and not args.ship:
        parser.error("--from: only with --ship")
    configure_threads(args.threads)
    cfg = organism_config(args.env, seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
    if args.ship:
        out = ship(args.source, cfg=cfg)
        print(f"organism shipped to {out}")
    else:
        out = build_organism(cfg, args.output_dir)
        print(f"organism saved to {out}")
    if args.evaluate:
        from route.models.evaluate import evaluate_dir, format_rates

        print(format_rates(evaluate_dir(out, cfg.env, n=args.evaluate, env_kwargs=cfg.env_kwargs)))


if __name__ == "__main__":
    main()
