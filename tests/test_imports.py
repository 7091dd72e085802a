"""The package's import graph has no cycles, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tim4rec_pl

PACKAGE = Path(tim4rec_pl.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (module level, in functions, under TYPE_CHECKING)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` reaches a.b.c; `from a import f` reaches a
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # parents are imported first
                found.add(target)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "tim4rec_pl.model.tim4rec" in graph and "tim4rec_pl.inference.network" in graph


def test_model_never_imports_the_inference_path() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("tim4rec_pl.model"):
            assert not any(t.startswith("tim4rec_pl.inference") for t in _imports(name, path, modules)), name


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module first, with none of the package imported before it (torch stays loaded: one interpreter)."""
    code = (
        "import importlib, sys\n"
        "for n in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'tim4rec_pl' or m.startswith('tim4rec_pl.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(n)\n"
    )
    names = sorted(_modules(), reverse=True)
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
