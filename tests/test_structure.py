"""The package's shape, read from its source with ``ast`` (nothing is imported): every import at
any depth counts, lazy ones in functions included, relative ones resolved.

- no import cycle between modules;
- nothing at the package root but the public face (``__init__.py``, ``cli.py``, ``__main__.py``);
- each stage imports only the stages below it, in ``STAGES``' order;
- no function over ``MAX_LINES`` lines and no constructor over ``MAX_PARAMETERS`` parameters,
  unless a ``# size:`` comment on the line above it says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "recsys_hnm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The stages, lowest first: a module may import its own stage and those before it, never one
# after it. A stage is a folder of the package; "cli" is cli.py, "__init__" the package's own
# __init__.py (the public face, on top).
#   ops        domain-free helpers: sparse/jagged, top-k with masking, atomic files, ConfigError
#   data       interactions, known positives, splits, profile, co-purchase, loaders
#   index      nearest-neighbour item indexes and their defaults
#   sampling   one file per negative source (ANN included), the mixture
#   mining     selection on logits, memory bank
#   models     towers, features, embeddings and their scorer
#   training   the loop, losses, callbacks, index refresh, the sharded backend
#   evaluation full-ranking evaluator and metrics
#   baselines  MostPop, ItemKNN, EASE, ALS, tuned on validation (no MLflow)
#   tracking   MLflow: runs, parent/child naming, the pyfunc model
#   config     the YAML schema, loading, overrides
#   experiment one config-driven run: build, train, load, recommend, offline mining, baseline runs
#   studies    pipelines, search, comparisons
STAGES = [
    "ops", "data", "index", "sampling", "mining", "models", "training", "evaluation", "baselines", "tracking",
    "config", "experiment", "studies", "cli", "__init__",
]
ROOT_MODULES = {"__init__.py", "cli.py", "__main__.py"}
MAX_LINES, MAX_PARAMETERS = 60, 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, known: set[str], source: str | None = None) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (a ``from X import name``
    of a submodule ``X.name`` counts as importing ``X.name``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [(source, [a.name for a in node.names])]
        else:
            continue
        for source, names in targets:
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            subs = [f"{source}.{n}" for n in names if f"{source}.{n}" in known]
            found.update(subs)
            if len(subs) < len(names) or not names:
                while source not in known:  # `import recsys_hnm.a.b` of a module: itself
                    source = source.rpartition(".")[0]
                found.add(source)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Each import of a later stage by an earlier one, as "a (stage) -> b (stage)"."""
    rank = {s: i for i, s in enumerate(STAGES)}
    return sorted(f"{a} ({stage(a)}) -> {b} ({stage(b)})" for a, targets in edges.items() for b in targets
                  if rank[stage(b)] > rank[stage(a)])


def test_every_module_has_a_stage():
    assert sorted({stage(m) for m in modules()} - set(STAGES)) == []


def test_only_the_public_face_at_the_package_root():
    assert sorted(p.name for p in ROOT.glob("*.py") if p.name not in ROOT_MODULES) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_stage_imports_a_later_one():
    assert upward(graph()) == []


def test_the_checks_see_what_they_must_refuse():
    """The checks are not vacuous: an upward import, a lazy one in a function, and a cycle are found."""
    edges = graph()
    assert edges["recsys_hnm.cli"], "the CLI imports the package"
    assert "recsys_hnm.experiment" in edges["recsys_hnm.studies.pipeline"]  # lazy: inside run_job
    bad = {**edges, "recsys_hnm.data.splits": edges["recsys_hnm.data.splits"] | {"recsys_hnm.experiment.run"}}
    assert "recsys_hnm.data.splits (data) -> recsys_hnm.experiment.run (experiment)" in upward(bad)
    assert any("recsys_hnm.data.splits" in c for c in cycles(bad))


@pytest.mark.parametrize("source, expected", [
    ("from ..ops.sparse import row_ids", {"recsys_hnm.ops.sparse"}),
    ("def f():\n    from ..experiment import train", {"recsys_hnm.experiment"}),
    ("from .. import experiment", {"recsys_hnm.experiment"}),
    ("import recsys_hnm.training.refresh as r", {"recsys_hnm.training.refresh"}),
])
def test_imports_are_resolved(source, expected):
    probe = ROOT / "data" / "_probe_.py"  # read as a module of recsys_hnm.data; never written
    assert imports(probe, set(modules()), source) == expected


def oversized(path: Path, source: str | None = None) -> list[str]:
    """Functions over MAX_LINES lines and constructors over MAX_PARAMETERS parameters (self not
    counted) without a ``# size:`` comment on the line above the ``def`` (or its decorators)."""
    text = path.read_text() if source is None else source
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs][1 if node.name == "__init__" else 0:]
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        excused = first >= 2 and lines[first - 2].strip().startswith("# size:")
        if excused:
            continue
        if length > MAX_LINES:
            found.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
        if node.name == "__init__" and len(params) > MAX_PARAMETERS:
            found.append(f"{path.name}:{node.lineno} {node.name}: {len(params)} parameters")
    return found


def test_no_long_function_and_no_wide_constructor():
    assert [f for p in sorted(ROOT.rglob("*.py")) for f in oversized(p)] == []


def test_the_size_check_sees_what_it_must_refuse():
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    wide = ", ".join(f"a{i}" for i in range(MAX_PARAMETERS + 1))
    source = f"def long():\n{long_body}\n\nclass C:\n    def __init__(self, {wide}):\n        pass\n"
    assert oversized(ROOT / "_probe_.py", source) == ["_probe_.py:1 long: 61 lines", f"_probe_.py:{MAX_LINES + 4} __init__: 13 parameters"]
    assert oversized(ROOT / "_probe_.py", "# size: a table\n" + source.replace("class C", "# size: wide\nclass C")) == [
        f"_probe_.py:{MAX_LINES + 6} __init__: 13 parameters"]  # the comment must sit above the def itself
