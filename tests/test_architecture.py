"""The package's shape, checked statically (README "Layout"): one idea per module, no import
cycles, library packages below a thin CLI.

    python -m pytest -q tests/test_architecture.py

Imports are read from the source with `ast`, function-level (lazy) imports included, so a cycle
hidden behind a lazy import is still a cycle. An import runs what Python runs: `from ..data import
X` executes data/__init__.py (and what it imports) before X, so a cycle through a package __init__
is a cycle; `importlib.import_module("aftune.x")` and `__import__` with string literals are imports,
and so are the module-path strings of a module that imports a computed name (aftune/__init__'s
`_API`). Each check is a function of a package root; the tests at the end run them on mutated
copies of the package, so each check is shown to catch what it is for.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "aftune"
MAX_LINES = 500
# Lower layers never import higher ones. Packages of one layer do not import each other either,
# except a pair in SAME_LAYER_IMPORTS; a package imports its own modules freely.
LAYERS = [
    {"errors", "builtin", "version"},  # leaves: the exception hierarchy, packaged files, the version
    {"core"},  # encoding, Merkle, signing, storage: raise errors.*
    {"models"},
    {"data", "verdict"},
    {"training"},
    {"inference"},
    {"protocol", "attestation", "partition"},
    {"reporting"},
    {"attacks"},
    {"workflows", "integrations"},  # integrations: hooks into other tools (a Trainer callback)
    {"api"},
    {"cli", "__init__", "__main__"},
]
# (importing package, imported package) within one layer -> why it is allowed
SAME_LAYER_IMPORTS = {
    ("__main__", "cli"): "`python -m aftune` is the CLI's entry point and nothing else",
}
# Programs of their own, not library code the CLI calls: the spawned processes of a partition.
OWN_PROCESSES = {"aftune.partition.link": "ends a spawned partition process without interpreter teardown"}


# --- reading the imports ---------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Import:
    source: str  # the importing module
    target: str  # a module this import executes or takes names from
    line: int
    eager: bool  # runs when `source` is imported (module or class level), not in a function


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package directory `root` (a package is its
    __init__)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


@lru_cache(maxsize=None)
def _parse(text: str) -> ast.Module:  # trees are only read; copies share the unchanged modules' trees
    return ast.parse(text)


def _existing(name: str, mods: dict[str, Path]) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def _chain(target: str, mods: dict[str, Path]) -> list[str]:
    """What importing `target` executes: each package on the way down (its __init__), then target."""
    parts = target.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in mods]


def _scopes(tree: ast.AST):
    """(node, eager) for every node: eager unless inside a function or an `if TYPE_CHECKING:`."""
    todo = [(tree, True)]
    while todo:
        node, eager = todo.pop()
        yield node, eager
        inner = eager and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += [(c, False) for c in node.body] + [(c, inner) for c in node.orelse]
            continue
        todo += [(c, inner) for c in ast.iter_child_nodes(node)]


_DYNAMIC = {"import_module", "__import__"}
_DOTTED = r"{}(\.[A-Za-z_]\w*)*"


def _dynamic_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id in _DYNAMIC) or (isinstance(f, ast.Attribute) and f.attr in _DYNAMIC)


def _resolve(level: int, module: str | None, package: list[str]) -> str:
    base = package[: len(package) - level + 1] if level else []
    return ".".join(base + ([module] if module else []))


def imports(root: Path) -> list[Import]:
    """Every import of a module of the package `root` by a module of it, as the interpreter runs it."""
    mods = modules(root)
    found: set[Import] = set()
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        already = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # run before `name`

        def add(target: str, line: int, eager: bool, names_from: bool = False) -> None:
            # importing `target` runs the packages above it and it; the packages above `name` have
            # already started (not run again), unless `name` takes names from one of them
            for m in _chain(target, mods):
                if m != name and (m not in already or (names_from and m == _existing(target, mods))):
                    found.add(Import(name, m, line, eager))

        tree = _parse(path.read_text(encoding="utf-8"))
        computed = []  # eagerness of each dynamic import of a computed name
        for node, eager in _scopes(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(_existing(a.name, mods), node.lineno, eager)
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node.level, node.module, package)
                if not module.startswith(root.name):
                    continue
                for a in node.names:
                    if f"{module}.{a.name}" in mods:  # `from package import module`
                        add(f"{module}.{a.name}", node.lineno, eager)
                    else:  # `from module import name`: the module must have run (far enough)
                        add(_existing(module, mods), node.lineno, eager, names_from=True)
            elif _dynamic_call(node):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    target = arg.value
                    if target.startswith("."):  # import_module(".x", package)
                        anchor = node.args[1] if len(node.args) > 1 else None
                        anchor = anchor.value if isinstance(anchor, ast.Constant) else ".".join(package)
                        level = len(target) - len(target.lstrip("."))
                        target = _resolve(level, target.lstrip(".") or None, anchor.split("."))
                    if target.split(".")[0] == root.name:
                        add(_existing(target, mods), node.lineno, eager)
                else:
                    computed.append(eager)
        if computed:  # a computed name: the module paths the module spells out (e.g. a name -> module dict)
            dotted = re.compile(_DOTTED.format(re.escape(root.name)))
            for node, _ in _scopes(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted.fullmatch(node.value):
                    add(_existing(node.value, mods), node.lineno, any(computed))
    return sorted(found)


def import_graph(root: Path, eager_only: bool = False, found: list[Import] | None = None) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules(root)}
    for i in imports(root) if found is None else found:
        if i.eager or not eager_only:
            graph[i.source].add(i.target)
    return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def cycle_problems(root: Path) -> list[str]:
    """Every import cycle, lazy imports included; one of module-level imports is marked as what it
    is, an import that fails (or sees a half-initialised module) at import time."""
    found = imports(root)
    eager = _components(import_graph(root, eager_only=True, found=found))
    return ["import-time cycle (module-level imports): " + " <-> ".join(c) for c in eager] + \
        ["import cycle: " + " <-> ".join(c) for c in _components(import_graph(root, found=found)) if c not in eager]


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _layer(module: str, layers: list[set[str]]) -> int:
    for i, layer in enumerate(layers):
        if _package(module) in layer:
            return i
    raise AssertionError(f"{module}: its package {_package(module)!r} is in no layer of tests/test_architecture.py")


def layer_problems(root: Path, layers: list[set[str]] = LAYERS,
                   allowed: dict[tuple[str, str], str] = SAME_LAYER_IMPORTS) -> list[str]:
    """Imports of a higher layer, and of another package of the same layer not in `allowed`."""
    wrong = set()
    for i in imports(root):
        src, dst = _layer(i.source, layers), _layer(i.target, layers)
        if dst > src:
            wrong.add(f"{i.source}:{i.line} -> {i.target} (a higher layer)")
        elif dst == src and _package(i.source) != _package(i.target) \
                and (_package(i.source), _package(i.target)) not in allowed:
            wrong.add(f"{i.source}:{i.line} -> {i.target} (another package of its layer)")
    return sorted(wrong)


def size_problems(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    return sorted(f"{name}: {n} lines" for name, path in modules(root).items()
                  if (n := len(path.read_text(encoding="utf-8").splitlines())) > max_lines)


def output_problems(root: Path) -> list[str]:
    """Calls that print or exit, and terminal UI libraries, outside the CLI."""
    offenders = []
    for name, path in modules(root).items():
        if _package(name) in ("cli", "__main__") or name in OWN_PROCESSES:
            continue
        for node in ast.walk(_parse(path.read_text(encoding="utf-8"))):
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
    return offenders


# --- the package as it is ------------------------------------------------------------------------

def test_no_module_is_over_500_lines():
    big = size_problems(PACKAGE)
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_import_cycles():
    cycles = cycle_problems(PACKAGE)
    assert not cycles, "\n".join(cycles)


def test_lower_layers_never_import_higher_ones_nor_their_own_layer():
    wrong = layer_problems(PACKAGE)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_same_layer_allowance_is_used():
    used = {(_package(i.source), _package(i.target)) for i in imports(PACKAGE)}
    assert set(SAME_LAYER_IMPORTS) <= used, f"stale allowances: {set(SAME_LAYER_IMPORTS) - used}"
    for (a, b) in SAME_LAYER_IMPORTS:
        assert any(a in layer and b in layer for layer in LAYERS), f"{a} and {b} are not of one layer"


def test_the_public_api_names_are_imports_of_the_top_level_package():
    """aftune/__init__'s `_API` (name -> module path) is read as lazy imports of those modules."""
    targets = {i.target for i in imports(PACKAGE) if i.source == "aftune" and not i.eager}
    assert {"aftune.api", "aftune.training.agreement", "aftune.verdict.comparison", "aftune.errors"} <= targets


def test_nothing_below_the_cli_prints_or_exits():
    offenders = output_problems(PACKAGE)
    assert not offenders, "\n".join(offenders)


# --- the checks catch what they are for: violations injected into a copy of the package ----------

@pytest.fixture
def copy(tmp_path):
    """A copy of the package's Python files (tmp_path/aftune)."""
    root = tmp_path / "aftune"
    shutil.copytree(PACKAGE, root, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or ((Path(d) / n).is_file() and not n.endswith(".py"))])
    return root


def inject(root: Path, module: str, code: str, top: bool = True) -> None:
    """Add `code` to a module of the copy: after its __future__ import (top) or at its end."""
    path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists() and path.with_suffix("").is_dir():
        path = path.with_suffix("") / "__init__.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    at = len(lines)
    if top:
        future = [n for n, s in enumerate(lines) if s.startswith("from __future__")]
        at = future[-1] + 1 if future else 0
    path.write_text("\n".join(lines[:at] + code.splitlines() + lines[at:]) + "\n", encoding="utf-8")


def _import_in_copy(root: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root.parent, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(root.parent), "PATH": ""})


def test_the_copy_is_clean(copy):
    assert not cycle_problems(copy) and not layer_problems(copy) and not output_problems(copy)


def test_a_cycle_through_a_package_init_is_an_import_time_cycle(copy):
    """verdict.comparison -> aftune.data (its __init__ runs data.batches) -> verdict.comparison:
    `import aftune.data` raises ImportError, and the checker names the cycle through data/__init__."""
    inject(copy, "aftune.verdict.comparison", "from ..data import build_batch")
    inject(copy, "aftune.data.batches", "from ..verdict.comparison import Tolerance")
    cycles = cycle_problems(copy)
    assert any(c.startswith("import-time cycle") and "aftune.data <->" in c and "aftune.verdict.comparison" in c
               for c in cycles), cycles
    run = _import_in_copy(copy, "aftune.data")
    assert run.returncode != 0 and "ImportError" in run.stderr, run.stderr[-2000:]


def test_a_lazy_cycle_is_a_cycle_but_not_an_import_time_one(copy):
    inject(copy, "aftune.verdict.comparison", "def _late():\n    from ..data import build_batch\n", top=False)
    inject(copy, "aftune.data.batches", "from ..verdict.comparison import Tolerance")
    cycles = cycle_problems(copy)
    assert cycles and all(c.startswith("import cycle: ") for c in cycles), cycles
    assert any("aftune.data <->" in c for c in cycles), cycles


def test_an_import_between_packages_of_one_layer_is_reported(copy):
    inject(copy, "aftune.protocol.check", "def _late():\n    from ..attestation import verdict\n", top=False)
    inject(copy, "aftune.verdict.threads", "from ..data.order import epoch_order")
    wrong = layer_problems(copy)
    assert any(w.startswith("aftune.protocol.check:") and "aftune.attestation.verdict (another package" in w
               for w in wrong), wrong
    assert any(w.startswith("aftune.verdict.threads:") and "aftune.data" in w for w in wrong), wrong
    allowed = {**SAME_LAYER_IMPORTS, ("protocol", "attestation"): "test", ("verdict", "data"): "test"}
    assert not layer_problems(copy, allowed=allowed)


@pytest.mark.parametrize("code, module", [
    ("import importlib\ndef _late():\n    return importlib.import_module('aftune.training.settings')\n",
     "aftune.models.shapes"),
    ("def _late():\n    return __import__('aftune.inference.policy')\n", "aftune.models.shapes"),
    ("from importlib import import_module\nx = import_module('.settings', 'aftune.training')\n",
     "aftune.models.shapes"),
    ("import importlib\n_WHERE = {'Thing': 'aftune.attacks.lazy'}\n"
     "def _get(name):\n    return importlib.import_module(_WHERE[name])\n", "aftune.core.store"),
], ids=["import_module", "__import__", "relative", "name-dict"])
def test_dynamic_imports_are_imports(copy, code, module):
    inject(copy, module, code, top=False)
    wrong = layer_problems(copy)
    assert any(w.startswith(module + ":") and "(a higher layer)" in w for w in wrong), wrong


def test_workflows_sits_between_attacks_and_api(copy):
    inject(copy, "aftune.workflows.placeholder", "from ..attacks import lazy\n")
    assert not layer_problems(copy)
    inject(copy, "aftune.workflows.placeholder", "from .. import api\n")
    inject(copy, "aftune.attacks.lazy", "def _late():\n    from ..workflows import placeholder\n", top=False)
    wrong = layer_problems(copy)
    assert any(w.startswith("aftune.workflows.placeholder:") and w.endswith("aftune.api (a higher layer)")
               for w in wrong), wrong
    assert any(w.startswith("aftune.attacks.lazy:") and "aftune.workflows" in w for w in wrong), wrong


def test_a_module_over_the_limit_and_a_print_are_reported(copy):
    inject(copy, "aftune.core.merkle", "\n" * (MAX_LINES + 1) + "def _say():\n    print('hi')\n", top=False)
    assert any(p.startswith("aftune.core.merkle:") for p in size_problems(copy))
    assert any(p.startswith("aftune.core.merkle:") and "print" in p for p in output_problems(copy))
