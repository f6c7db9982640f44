"""The house rules of the source tree: small modules, no import cycles, inference without the training stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(SRC.joinpath("boneage").rglob("*.py"))
MAX_LINES = 400


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """boneage modules that ``path`` imports anywhere: at module level and inside functions, classes and ``try``
    (an import deferred into a function still closes a cycle, it only hides it until run time); not the body
    of an ``if TYPE_CHECKING:`` block, which never runs."""
    found: set[str] = set()
    known = {_name(p) for p in MODULES}
    tree = ast.parse(path.read_text())
    type_only = {id(sub) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for stmt in node.body for sub in ast.walk(stmt)}
    for sub in ast.walk(tree):
        if id(sub) in type_only:
            continue
        if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0 and sub.module.startswith("boneage"):
            for alias in sub.names:
                full = f"{sub.module}.{alias.name}"
                found.add(full if full in known else sub.module)
        elif isinstance(sub, ast.Import):
            found.update(a.name for a in sub.names if a.name.startswith("boneage"))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path}: split it by concern"


def test_there_are_no_import_cycles():
    graph = {_name(p): _imports(p) - {_name(p)} for p in MODULES}
    for name in graph:  # a package's __init__ is imported before its modules: an edge to it is no cycle
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_cycle(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from boneage.models import registry\nimport boneage.io\n")
    assert _imports(a) == {"boneage.models.registry", "boneage.io"}


def test_the_cycle_check_sees_imports_inside_functions_but_not_type_checking_blocks(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from boneage.config import Config\n"
                 "else:\n    import boneage.errors\n"
                 "class A:\n    def f(self):\n        try:\n"
                 "            from boneage.models.registry import create_model\n"
                 "        except ImportError:\n            pass\n"
                 "def g():\n    def h():\n        import boneage.io\n")
    assert _imports(a) == {"boneage.models.registry", "boneage.io", "boneage.errors"}


def test_inference_imports_no_training_package():
    code = ("import sys, boneage.cli, boneage.inference.batch, boneage.inference.evaluate, boneage.inference.onnx, "
            "boneage.serve.app; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'catalyst', 'accelerate', 'tensorboard', 'matplotlib', 'boneage.training'}), "
            "'boneage.training' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "False"], done.stdout
