"""Files: atomic writes (readers see the old file/directory or the new one, never half of one), CSV, YAML configs,
and the check that a directory is a usable causal-LM checkpoint.

A directory written with `atomic_dir(path)` is a version directory `.<name>.v<id>` next to `path`, and `path` itself is
a symlink to it; a replacement writes a new version, fsyncs it, and swaps the symlink with one `rename(2)`, so `path`
always exists and always names a complete version (`from_pretrained(path)` follows the link). The previous version is
kept until the next replacement, so a reader that resolved the link just before a swap can finish reading.
"""

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
        fsync_dir(path.parent)
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


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `path` atomically (format from the suffix, PNG by default) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


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


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: renames, new files) so that they survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _crash_point(step: str) -> None:
    """Named steps of `atomic_dir`; tests replace this to inject a crash at each one."""


def _versions(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.v*") if p.is_dir() and not p.is_symlink()]


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh version directory next to `path`; on success `path` becomes a symlink to it in one rename.

    Steps: write (the caller), fsync the version's files and directories, make a temporary symlink to it, rename
    that onto `path` (atomic: `path` names the old version or the new one, never nothing), fsync the parent, then
    delete versions older than the one just replaced. An error or crash at any step leaves `path` as it was (at
    worst an unused hidden version or link next to it). A `path` that is a real directory (written before versions
    existed) is moved aside first; only that one-time migration has a moment where `path` is absent.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix=f".{path.name}.v", dir=path.parent))
    link = path.with_name(f".{path.name}.link{os.getpid()}.{version.name[-8:]}")
    try:
        yield version
        _crash_point("written")
        os.chmod(version, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        fsync_tree(version)
        _crash_point("synced")
        os.symlink(version.name, link)  # relative: the pair can be moved together
        _crash_point("linked")
        previous = os.path.realpath(path) if path.is_symlink() else None
        if path.exists() and not path.is_symlink():  # legacy real directory: move it aside once
            previous = str(path.with_name(f".{path.name}.v-legacy{os.getpid()}"))
            os.replace(path, previous)
        os.replace(link, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        raise
    _crash_point("swapped")
    keep = {version.resolve(), Path(previous).resolve() if previous else None}
    for old in _versions(path):  # keep the previous version for readers that resolved the link before the swap
        if old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)


def pop_config_arg(argv: list[str], default: str | None = None) -> tuple[str | None, list[str]]:
    """Split `--config FILE` (or `--config=FILE`) out of `argv`: (path or `default`, remaining args).

    A path that is not a file is a ValueError naming `--config`: checked here, before any heavy import."""
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
    if not os.path.isfile(path):
        raise ValueError(f"--config: no such file: {path}")
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
    from route.utils.errors import dataclass_parser, parse_dataclasses

    parser = dataclass_parser(HfArgumentParser, cls)
    parser.usage = "%(prog)s [--config FILE.yaml] [--FIELD VALUE ...] [--debug]"
    parser.add_argument("--config", metavar="FILE.yaml",
                        help=f"YAML file of any of the fields below; flags win over it (default: {default_config})")
    parser._action_groups[1]._group_actions.sort(key=lambda a: a.dest not in ("help", "config", "debug"))
    if path is not None:
        values = load_yaml_mapping(path)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"--config {path}: unknown fields {unknown}; see --help for the fields")
        parser.set_defaults(**values)
    return parse_dataclasses(parser, argv)[0]  # `--config` was taken out: its value comes back last

