"""The package's layering: every import inside route/ (at module level or inside a function) goes to the same
subpackage or a lower layer, and the modules' import graph has no cycle. The layers are the ones the subpackages'
docstrings name (lowest first); a module not in any layer fails the test, so a new subpackage must be placed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # lowest first; a module may import its own layer and the layers below
    ("route", "route.utils"),  # `route` itself: the package's __init__ (threads, kernels, old names)
    ("route.masks",),
    ("route.monitors",),
    ("route.models",),
    ("route.targets",),
    ("route.vllm",),
    ("route.trainer", "route.train_grpo"),
    ("route.experiments",),
    ("route.cli", "route.__main__"),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "route").rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The route modules `name` imports anywhere in its source (lazy imports included), as module names."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import route.x.y` of an attribute: the module that holds it
                t = t.rpartition(".")[0]
            if t.startswith("route") and t != name:
                out.add(t)
    return out


def layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or (p != "route" and name.startswith(p + "."))) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"{name} is in no layer of tests/test_layout.py's LAYERS: place it")
    return best[0]


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                  for m, deps in g.items() for t in deps if layer(t) > layer(m))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or a knot of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer_and_imports_only_downward():
    g = graph()
    assert len(g) > 80 and sum(map(len, g.values())) > 250  # the whole package was parsed, imports resolved
    assert {layer(m) for m in g} == set(range(len(LAYERS)))  # every layer holds modules
    assert upward(g) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_each_subpackage_says_what_it_owns_and_may_import():
    packages = [p for p in sorted((ROOT / "route").iterdir()) if (p / "__init__.py").exists()]
    assert len(packages) >= 7
    for p in packages:
        doc = ast.get_docstring(ast.parse((p / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"route/{p.name}/__init__.py: its docstring must say what it may import"


@pytest.mark.parametrize("source, expected", [
    ("from route.experiments.sweep import write_csv\n", "imports route.experiments.sweep"),  # lazy or not
    ("def f():\n    from route.trainer import config\n", "imports route.trainer.config"),
])
def test_an_upward_import_fails(tmp_path, source, expected):
    """The check itself: a copy of the package with route.utils.io importing an upper layer is refused."""
    import shutil

    shutil.copytree(ROOT / "route", tmp_path / "route", ignore=shutil.ignore_patterns("organisms", "__pycache__"))
    io = tmp_path / "route" / "utils" / "io.py"
    io.write_text(io.read_text() + "\n" + source)
    found = upward(graph(tmp_path))
    assert any(line.startswith("route.utils.io (layer 0) " + expected) for line in found), found


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
