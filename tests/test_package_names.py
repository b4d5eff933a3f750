"""`accelerate launch route/train_grpo.py` (the README's main command) runs the file as a script, which puts route/
itself first on sys.path: a module there named like a standard-library module would shadow it for every library
the job imports (a `route/select.py` once broke transformers' import of `select`). Checked statically, no process."""

from __future__ import annotations

import sys
from pathlib import Path

ROUTE = Path(__file__).resolve().parent.parent / "route"
# imported by the interpreter itself before sys.path exists, so a route/ module of that name cannot shadow it
PRELOADED = {"io"}


def test_no_top_level_route_module_shadows_the_standard_library():
    names = {p.stem for p in ROUTE.glob("*.py")} | {p.name for p in ROUTE.iterdir() if (p / "__init__.py").exists()}
    assert "train_grpo" in names and len(names) > 8  # the scan saw the package
    assert sorted(names & set(sys.stdlib_module_names) - PRELOADED) == []
    assert all(name in sys.modules for name in PRELOADED)  # still preloaded in this interpreter
