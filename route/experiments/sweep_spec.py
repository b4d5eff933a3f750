"""The sweep file and its cells: parsing, expansion into cells, validation before any cell runs, the manifest.

See `route.experiments.sweep` for the file format and the command line; this module holds everything that happens before
a cell runs (and is read again when a sweep is aggregated or resumed).
"""

from __future__ import annotations

import difflib
import io
import itertools
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from route.utils.io import write_json_atomic

DEFAULT_BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
SPEC_KEYS = ("base_config", "base", "grid", "output_dir", "description")
RESERVED = ("output_dir",)  # set by the sweep for every cell
ALIASES = {"detector_tpr": "tpr", "detector_fpr": "fpr", "detector_modes": "known"}


class SweepError(ValueError):
    """A malformed sweep file, an invalid cell config or a conflicting output directory."""


@dataclass
class Cell:
    index: int
    name: str
    overrides: dict[str, Any]  # this cell's grid values
    values: dict[str, Any]  # the full config mapping written to cell.yaml
    dir: Path

    @property
    def done(self) -> bool:
        return (self.dir / "results.json").exists()


# ---------------------------------------------------------------------------------------------- the sweep file
def config_fields() -> list[str]:
    from route.trainer.parse import config_fields as fields

    return fields()


def _check_field(where: str, name: Any, fields: list[str]) -> None:
    if not isinstance(name, str) or name not in fields:
        close = difflib.get_close_matches(str(name), fields, n=3)
        hint = f"; did you mean {close}?" if close else "; see route.train_grpo --help"
        raise SweepError(f"{where}: unknown field {name!r}{hint}")
    if name in RESERVED:
        raise SweepError(f"{where}: field {name!r} is set by the sweep for each cell; remove it")


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sweep file; returns {base_config, base, grid, output_dir} with the base config resolved."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path}: must be a YAML mapping with keys {list(SPEC_KEYS)}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise SweepError(f"sweep file {path}: unknown keys {unknown}; allowed keys: {list(SPEC_KEYS)}")
    fields = config_fields()
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"sweep file {path}: base must be a mapping of config fields, got {type(base).__name__}")
    for name in base:
        _check_field(f"{path}: base", name, fields)
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"sweep file {path}: grid must be a non-empty mapping of field -> list of values")
    for name, values in grid.items():
        for part in tied(name):
            _check_field(f"{path}: grid", part, fields)
        if not isinstance(values, list):
            raise SweepError(f"{path}: grid.{name} must be a list of values, got {type(values).__name__} "
                             f"{values!r}; write [{values!r}] for a single value")
        if not values:
            raise SweepError(f"{path}: grid.{name} is an empty list; give at least one value")
        keys = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(keys)) != len(keys):
            raise SweepError(f"{path}: grid.{name} lists a value twice: {values}")
        both = [part for part in tied(name) if part in base]
        if both:
            raise SweepError(f"{path}: field {both[0]!r} is in both base and grid; keep it in one place")
    parts = [part for name in grid for part in tied(name)]
    if len(set(parts)) != len(parts):
        raise SweepError(f"{path}: grid names a field twice (alone or in an a+b key): {parts}")
    base_config = spec.get("base_config", str(DEFAULT_BASE_CONFIG))
    defaults: dict[str, Any] = {}
    if base_config is not None:
        bc = Path(base_config)
        if not bc.is_absolute() and (path.parent / bc).exists():  # relative to the sweep file, else to the cwd
            bc = path.parent / bc
        if not bc.exists():
            raise SweepError(f"sweep file {path}: base_config {base_config} does not exist")
        defaults = yaml.safe_load(bc.read_text()) or {}
        if not isinstance(defaults, dict):
            raise SweepError(f"base_config {bc}: must be a YAML mapping of config fields")
        base_config = str(bc.resolve())
    return {"base_config": base_config, "defaults": defaults, "base": base, "grid": grid,
            "output_dir": spec.get("output_dir")}


def tied(name: str) -> list[str]:
    """The fields of a grid key: `seed+detector_seed` sets both fields to each value (paired seeds)."""
    return name.split("+")


def tied_values(name: str, value: Any) -> dict[str, Any]:
    """One grid value of key `name` as field -> value: a list with one item per field of an `a+b` key is
    assigned item by item (`intervention+flag_control: [[route, random], ...]`), anything else goes to every field."""
    parts = tied(name)
    if len(parts) > 1 and isinstance(value, (list, tuple)) and len(value) == len(parts):
        return dict(zip(parts, value))
    return dict.fromkeys(parts, value)


def fmt_value(name: str, value: Any) -> str:
    if value is None:
        return "all" if name == "detector_modes" else "none"
    if isinstance(value, (list, tuple)):
        return "+".join(fmt_value(name, v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{fmt_value(name, v)}" for k, v in value.items())
    return str(value)


def cell_name(overrides: dict[str, Any]) -> str:
    """A directory name from a cell's grid values: stable when values are added to the grid."""
    name = "_".join(f"{'+'.join(ALIASES.get(p, p) for p in tied(k))}={fmt_value(k, v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    if len(name) > 180:
        import hashlib

        name = f"{name[:160]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def expand(spec: dict[str, Any], output_dir: str | os.PathLike) -> list[Cell]:
    """The grid's cells in a stable order: itertools.product over fields in file order."""
    root = Path(output_dir).resolve() / "cells"
    names = list(spec["grid"])
    cells, seen = [], set()
    for i, combo in enumerate(itertools.product(*(spec["grid"][n] for n in names))):
        name = cell_name(dict(zip(names, combo)))
        overrides = {part: v for key, value in zip(names, combo) for part, v in tied_values(key, value).items()}
        if name in seen:  # distinct values that format alike
            name = f"{name}-{i}"
        seen.add(name)
        values = {**spec["defaults"], **spec["base"], **overrides, "output_dir": str(root / name)}
        cells.append(Cell(i, name, overrides, values, root / name))
    return cells


# ---------------------------------------------------------------------------------------------- validation
def dump_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def _check_model(where: str, model: Any) -> None:
    """A local model path must be a causal-LM checkpoint with a tokenizer; Hub ids ("name", "org/name") pass."""
    if model is None:
        return
    from route.models.pretrained import check_source, handles

    if handles(model):  # a short name or a .gguf file: its packages and file (converted when the cell runs)
        try:
            check_source("model_name_or_path", str(model))
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
        return
    p = Path(str(model)).expanduser()
    looks_local = p.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_local:
        from route.utils.io import check_checkpoint

        try:
            check_checkpoint(p)
        except ValueError as e:
            raise SweepError(f"{where}: model_name_or_path: {e}") from None


def validate(cells: Sequence[Cell]) -> None:
    """Parse every cell's config exactly as the main job will; raise SweepError naming the cell and the problem."""
    from route.trainer.parse import parse_config, probe_run

    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            where = f"cell {cell.index} ({cell.name})"
            path = Path(tmp) / f"{cell.index}.yaml"
            path.write_text(dump_yaml(cell.values))
            err = io.StringIO()
            try:
                from contextlib import redirect_stderr

                with redirect_stderr(err):
                    config = parse_config(["--config", str(path)])
                probe_run(config)  # the target against the model's module names and shapes (no weights)
            except SystemExit:
                raise SweepError(f"{where}: invalid config: {err.getvalue().strip().splitlines()[-1:]}") from None
            except Exception as e:  # noqa: BLE001 - re-raised with the cell named
                raise SweepError(f"{where}: {e}") from None
            _check_model(where, cell.values.get("model_name_or_path"))
            old = cell.dir / "cell.yaml"
            if old.exists():
                prev = yaml.safe_load(old.read_text()) or {}
                diff = sorted(k for k in set(prev) | set(cell.values)
                              if k != "output_dir" and prev.get(k) != cell.values.get(k))
                if diff:
                    raise SweepError(f"{where}: {cell.dir} holds a run with a different config (fields {diff}); "
                                     "use another --output_dir or delete that cell directory")


def write_manifest(output_dir: Path, cells: Sequence[Cell], spec: dict[str, Any]) -> None:
    write_json_atomic(output_dir / "sweep.json", {
        "base_config": spec["base_config"], "base": spec["base"], "grid": spec["grid"],
        "cells": [{"index": c.index, "name": c.name, "overrides": c.overrides} for c in cells]})


def manifest_cells(output_dir: Path) -> list[Cell]:
    """The cells recorded in DIR/sweep.json (or, without it, every DIR/cells/*/cell.yaml)."""
    root = output_dir.resolve() / "cells"
    manifest = output_dir / "sweep.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return [Cell(c["index"], c["name"], c["overrides"], {}, root / c["name"]) for c in data["cells"]]
    dirs = sorted(p.parent for p in root.glob("*/cell.yaml"))
    if not dirs:
        raise SweepError(f"{output_dir}: no sweep.json and no cells/*/cell.yaml; run the sweep first")
    return [Cell(i, d.name, {}, {}, d) for i, d in enumerate(dirs)]
