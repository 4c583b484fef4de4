"""The package layout: imports go one way, down the layers, and no module imports itself
back through a circle (docs/design.md, "Layout").

Read from the source with ``ast``, so an import inside a function or under
``TYPE_CHECKING`` counts as much as one at the top: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "busreg"

#: Layers from the bottom up. A module may import its own package and any lower layer.
#: Packages on one layer are siblings: they may not import each other.
LAYERS: list[set[str]] = [
    {"busreg.constants", "busreg.errors"},
    {"busreg.urls"},
    {"busreg.settings", "busreg.backoff", "busreg.tasks"},
    {"busreg.wire"},
    {"busreg.transport"},
    {"busreg.server", "busreg.client"},
    {"busreg.callers"},
    {"busreg.integrations"},
    {"busreg.ops"},
    {"busreg.bench", "busreg.testing", "busreg.pytest_plugin", "busreg.gateway", "busreg.agent"},
    {"busreg.ops.cli", "busreg"},
    {"busreg.__main__"},
]
#: Tools: no library package (wire .. integrations) may import them.
TOOLS = {
    "busreg.ops",
    "busreg.bench",
    "busreg.testing",
    "busreg.pytest_plugin",
    "busreg.gateway",
    "busreg.agent",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """busreg modules that ``name`` imports (resolved relative imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    modules = set(_modules())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "busreg"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "busreg":
                continue
            # ``from busreg.x import y`` may name a submodule y rather than a name of x
            subs = {f"{module}.{a.name}" for a in node.names} & modules
            found |= subs
            if len(subs) < len(node.names):
                found.add(module)
    return {m for m in found if m in modules and m != name}


def _unit(module: str) -> str:
    """The layered unit a module belongs to (its package, or itself at the top level)."""
    best = ""
    for layer in LAYERS:
        for unit in layer:
            if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
                best = unit
    return best


def _level(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


GRAPH = {name: _imports(name, path) for name, path in _modules().items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in GRAPH if not _unit(m))
    assert missing == [], f"add these to LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module: str) -> None:
    here = _unit(module)
    upward = []
    for target in sorted(GRAPH[module]):
        there = _unit(target)
        if there == here:
            continue
        if _level(there) >= _level(here):
            upward.append(f"{target} ({there}, layer {_level(there)})")
    assert upward == [], f"{module} (layer {_level(here)}) imports up or sideways: {upward}"


def test_no_import_cycles() -> None:
    # Tarjan-free: a depth-first search that reports the first back edge it finds
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt == "busreg":
                continue  # the package root re-exports; nothing below may import it
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == []


def test_nothing_below_the_top_imports_the_package_root() -> None:
    top = TOOLS | {"busreg", "busreg.ops.cli"}
    offenders = sorted(m for m, deps in GRAPH.items() if "busreg" in deps and _unit(m) not in top)
    assert offenders == []


def test_library_never_imports_the_tools() -> None:
    offenders = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _unit(m) not in TOOLS | {"busreg", "busreg.ops.cli", "busreg.__main__"}
        for t in targets
        if _unit(t) in TOOLS
    )
    assert offenders == []


def test_no_module_is_past_500_lines() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_importing_busreg_loads_no_worker_and_no_metrics() -> None:
    """What every client app pays: ``import busreg`` must not load the worker side."""
    code = (
        "import sys, busreg\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('busreg.server', 'busreg.ops',"
        " 'busreg.bench', 'prometheus_client')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
