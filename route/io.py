"""Files: atomic writes (readers see the old file/directory or the new one, never half of one), CSV, YAML configs,
and the check that a directory is a usable causal-LM checkpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", chmod: int | None = 0o644) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on success it is flushed, fsynced and renamed onto `path`
    (readers see the old file or the new one, never half of one); on error it is removed and `path` is untouched.

    `chmod`: the new file's permissions (mkstemp's 0600 would hide a shared cache from other users); None keeps 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if chmod is not None:
            os.chmod(tmp, chmod)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically (`atomic_file`)."""
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts; columns in first-seen order, NaN written empty) as a CSV file, atomically."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pop_config_arg(argv: list[str], default: str | None = None) -> tuple[str | None, list[str]]:
    """Split `--config FILE` (or `--config=FILE`) out of `argv`: (path or `default`, remaining args)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[i: i + 1] = ["--config", arg.split("=", 1)[1]]
    if "--config" not in argv:
        return default, argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ValueError("--config needs a file path")
    path = argv[i + 1]
    del argv[i: i + 2]
    return path, argv


def load_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping (empty file -> {}); anything else is a clear error."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must contain a YAML mapping")
    return values


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory (or `<run>/deployed`); ValueError when it is not a causal LM with a tokenizer."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint {path}: no such directory")
    if not (path / "config.json").exists() and (path / "deployed" / "config.json").exists():
        path = path / "deployed"
    if not path.is_dir() or not (path / "config.json").exists():
        raise ValueError(f"checkpoint {path}: no config.json; expected a transformers checkpoint directory "
                         "(save_pretrained) or a run directory with deployed/")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise ValueError(f"checkpoint {path}: config.json cannot be read: {e}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"checkpoint {path}: model_type {config.model_type!r} is not a causal language model")
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                               "pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"checkpoint {path}: no weights (model.safetensors or pytorch_model.bin)")
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise ValueError(f"checkpoint {path}: tokenizer missing or unreadable ({type(e).__name__}); save the "
                         "tokenizer next to the model") from None
    return path


def parse_dataclass_config(cls: type, argv: list[str] | None = None, default_config: str | None = None) -> Any:
    """`--config FILE.yaml` plus `--field value` overrides (flags win over the file) into the dataclass `cls`; the
    parser's `--help` lists `--config` and every field. Unknown YAML fields are a ValueError naming them."""
    import dataclasses
    import sys

    from transformers import HfArgumentParser

    path, argv = pop_config_arg(sys.argv[1:] if argv is None else argv, default_config)
    parser = HfArgumentParser(cls)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help=f"YAML file of any of the fields below; flags win over it (default: {default_config})")
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"--config: no such file: {path}")
        values = load_yaml_mapping(path)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config file {path}: unknown fields {unknown}")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)[0]  # `--config` was taken out: its value comes back last

