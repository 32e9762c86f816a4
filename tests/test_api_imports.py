"""The HTTP layer's imports, read from the source: no module of server/api imports another that
imports it back (not even for type checking only), and api never reaches below the engine."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

API = Path(__file__).resolve().parent.parent / "server" / "api"


def _module(path: Path) -> str:
    parts = ("server", "api", *path.relative_to(API).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every absolute module path a file imports, wherever the import statement sits."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _api_graph() -> dict[str, set[str]]:
    files = {_module(path): path for path in API.rglob("*.py")}
    return {name: (_imports(path) & files.keys()) - {name} for name, path in files.items()}


def test_no_import_circle_in_the_api():
    try:
        order = list(graphlib.TopologicalSorter(_api_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle in server/api: {' -> '.join(exc.args[1])}")
    assert "server.api.state" in order and "server.api.tgi" in order


def test_api_never_imports_the_runner_or_kernels():
    below = {
        f"{name}: {target}"
        for name, path in ((_module(p), p) for p in API.rglob("*.py"))
        for target in _imports(path)
        if target.startswith(("server.runner", "kernels"))
    }
    assert not below, below
