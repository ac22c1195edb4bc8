"""The layering DESIGN.md draws, checked on the source: who may import whom, and no import circles.

The graph has an edge for every `import` / `from ... import` of a first-party module anywhere in a
file (module level, inside functions, under TYPE_CHECKING): a lazy import still couples two layers.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "kvcache", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module name `path` imports (absolute; relative imports are not used in this project)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """first-party module -> the first-party modules it imports."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {mod: {name for name in imports_of(path) if name in files and name != mod} for mod, path in files.items()}


def all_imports(pkg: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in (ROOT / pkg).rglob("*.py")}


def test_no_import_circles(graph):
    """Depth-first search for a back edge; the message shows the circle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_dependencies_point_one_way(graph):
    for mod, deps in graph.items():
        if mod.startswith(("model", "kvcache")):
            assert not {d for d in deps if d.startswith("service")}, f"{mod} imports the service layer"
        if mod.startswith("kvcache"):
            assert not {d for d in deps if d.startswith("model")}, f"{mod} imports model"
        if mod.startswith("service.engine"):
            assert not {d for d in deps if d.startswith(("service.api", "service.server", "service.cli"))}, \
                f"{mod} (engine) imports the HTTP layer or the process wiring"
        if mod.startswith("service.api"):
            assert not {d for d in deps if d.startswith(("service.server", "service.cli"))}, \
                f"{mod} imports the process wiring"


def test_only_the_api_package_imports_fastapi_and_only_metrics_creates_metrics():
    for pkg in PACKAGES:
        for mod, names in all_imports(pkg).items():
            if not mod.startswith("service.api"):
                assert not {n for n in names if n.split(".")[0] in ("fastapi", "starlette")}, f"{mod} imports FastAPI"
            if mod != "service.metrics":
                assert not {n for n in names if n.startswith("prometheus_client") and not n.startswith(
                    "prometheus_client.parser")}, f"{mod} creates Prometheus metrics"


@pytest.mark.parametrize("module, absent", [
    ("service.engine", ("fastapi", "starlette", "uvicorn", "prometheus_client")),
    ("kvcache.manager", ("torch",)),
    ("kvcache.block_pool", ("torch",)),
    ("model.transformer", ("fastapi", "service")),
])
def test_importing_a_layer_loads_nothing_above_it(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"
