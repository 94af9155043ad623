"""The package's shape, checked statically (README "Layout"): one idea per module, no import
cycles, library packages below a thin CLI.

    python -m pytest -q tests/test_architecture.py

Imports are read from the source with `ast`, function-level (lazy) imports included, so a cycle
hidden behind a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "aftune"
MAX_LINES = 500
# Lower layers never import higher ones (a package may import its own layer and below).
LAYERS = [
    {"errors", "builtin", "version", "core"},
    {"models"},
    {"data", "verdict"},
    {"training"},
    {"inference"},
    {"protocol", "attestation", "partition"},
    {"reporting"},
    {"attacks"},
    {"api"},
    {"cli", "__init__", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The aftune modules `name` imports (an imported package counts as its __init__)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            submodules = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
            # `from package import module` depends on the module; `from module import name` on it
            targets = submodules if len(submodules) == len(node.names) else submodules + [module]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("aftune"):
                found.add(t)
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: its package {top!r} is in no layer of tests/test_architecture.py")


def test_no_module_is_over_500_lines():
    big = {name: n for name, path in _modules().items()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # package __init__ files that only re-export are part of their package: a package importing
    # its own __init__ (and the reverse) is not a cycle between ideas
    for name in list(graph):
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") or t.startswith(name + "."))}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_lower_layers_never_import_higher_ones():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(name, path, modules):
            if _layer(target) > _layer(name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


# Programs of their own, not library code the CLI calls: the spawned processes of a partition.
OWN_PROCESSES = {"aftune.partition.link": "ends a spawned partition process without interpreter teardown"}


def test_nothing_below_the_cli_prints_or_exits():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("aftune.cli") or name in ("aftune.__main__",) or name in OWN_PROCESSES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f"{getattr(f.value, 'id', '')}.{f.attr}" \
                    if isinstance(f, ast.Attribute) else ""
                if called in ("print", "exit", "quit", "sys.exit", "os._exit"):
                    offenders.append(f"{name}:{node.lineno} calls {called}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("typer", "rich", "click") for m in mods):
                    offenders.append(f"{name}:{node.lineno} imports a terminal UI library")
    assert not offenders, "\n".join(offenders)
