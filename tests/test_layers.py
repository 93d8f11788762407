"""The import graph of ``jobs/``, ``pipeline/`` and ``operators/``, function-level imports included: no cycle, no
module importing another module's underscore name, and every import pointing down the layers that
``pipeline/__init__.py`` maps (``jobs -> pipeline -> operators``; ``generate`` and ``filter`` never meet)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "pipeline", "operators")

# pipeline's layers, bottom first: a module may import its own layer's modules (without a cycle) and those below.
PIPELINE_LAYERS = [
    {"pipeline.config", "pipeline.schema", "pipeline.redact", "pipeline.score_rules", "pipeline.errors"},
    {"pipeline.io"},
    {"pipeline.output"},
    {"pipeline.session", "pipeline.stall"},
    {"pipeline.plan"},
    {"pipeline.generate", "pipeline.filter"},
    {"pipeline.review"},
    {"pipeline", "pipeline.run", "pipeline.curate"},
]
SIBLINGS = {"pipeline.generate": "pipeline.filter", "pipeline.filter": "pipeline.generate"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(edges module -> modules it imports, [(importer, module, private name)])."""
    edges: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, a.name) for a in node.names]
            else:
                continue
            for target, imported in targets:
                owner = _owner(target, known)
                if owner is None or owner == name:
                    continue
                edges[name].add(owner)
                if imported and imported.startswith("_") and target == owner and f"{owner}.{imported}" not in known:
                    private.append((name, owner, imported))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int:
    for rank, layer in enumerate(PIPELINE_LAYERS):
        if name in layer or any(name.startswith(f"{prefix}.") for prefix in layer if prefix != "pipeline"):
            return rank
    raise AssertionError(f"{name} is in no layer of PIPELINE_LAYERS: add it to the map (pipeline/__init__.py)")


def layering_problems(edges: dict[str, set[str]]) -> list[str]:
    order = {"jobs": 0, "pipeline": 1, "operators": 2}
    problems = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            top_a, top_b = a.split(".")[0], b.split(".")[0]
            if order[top_a] > order[top_b]:
                problems.append(f"{a} imports {b}: {top_a} must not import {top_b}")
            if top_a == top_b == "pipeline":
                la, lb = layer_of(a), layer_of(b)
                sub_a, sub_b = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
                if la < lb:
                    problems.append(f"{a} imports {b}, a layer above it")
                elif SIBLINGS.get(sub_a) == sub_b:
                    problems.append(f"{a} imports {b}: generate and filter never import each other")
            if top_a == "operators" and b in ("ray",):
                problems.append(f"{a} imports Ray")
    return problems


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, *imports(known)


def test_no_import_cycle(graph):
    _, edges, _ = graph
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_name(graph):
    _, _, private = graph
    assert private == []


def test_tests_and_benchmarks_use_public_names_only():
    """A test or benchmark that imports a private name breaks silently when that name changes: they use what
    the modules make public, as any caller would."""
    found = []
    for folder in ("tests", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and not node.level and \
                        (node.module or "").split(".")[0] in (*PACKAGES, "tests", "benchmarks"):
                    found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert found == []


def test_imports_point_down_the_layers(graph):
    known, edges, _ = graph
    for name in known:
        if name.startswith("pipeline"):
            layer_of(name)  # every module is on the map
    assert layering_problems(edges) == []


def test_operators_never_import_ray():
    for path in sorted((ROOT / "operators").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports Ray"


def test_the_guard_finds_a_cycle_a_private_import_and_an_upward_import(tmp_path):
    """The checks above on a small tree made to break each rule: a guard that cannot fail guards nothing."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/config.py": "from pipeline.io.fs import thing\n",  # bottom imports io: upward
        "pipeline/io/__init__.py": "",
        "pipeline/io/fs.py": "def f():\n    from pipeline.io.images import _secret\n",  # private, in a function
        "pipeline/io/images.py": "from pipeline.io import fs\n_secret = 1\n",  # fs <-> images: a cycle
        "pipeline/generate/__init__.py": "",
        "pipeline/generate/run.py": "import pipeline.filter.run\n",  # siblings
        "pipeline/filter/__init__.py": "",
        "pipeline/filter/run.py": "",
        "operators/__init__.py": "from pipeline import config\n",  # operators import pipeline
        "jobs/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    known = modules(tmp_path)
    edges, private = imports(known)
    assert cycles(edges) == [["pipeline.io.fs", "pipeline.io.images"]]
    assert private == [("pipeline.io.fs", "pipeline.io.images", "_secret")]
    problems = layering_problems(edges)
    assert any("pipeline.config imports pipeline.io.fs, a layer above" in p for p in problems)
    assert any("generate and filter never import each other" in p for p in problems)
    assert any("operators must not import pipeline" in p for p in problems)


def test_the_python_api_names_stay(graph):
    """docs/architecture.md §6: ``pipeline.run.run`` and ``pipeline.curate.curate`` are the code's own."""
    from pipeline.curate import curate
    from pipeline.filter.run import curate as filter_run
    from pipeline.generate.run import run as generate_run
    from pipeline.run import RunSummary, run

    assert run is generate_run and curate is filter_run and RunSummary.__module__ == "pipeline.output.record"
