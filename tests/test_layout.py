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


def _top_level_imports(path: Path) -> set[str]:
    """boneage modules imported when ``path`` is imported: module-level statements only (not inside functions,
    not under ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    known = {_name(p) for p in MODULES}
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ([node] if not isinstance(node, (ast.Try, ast.If)) else ast.walk(node)):
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
    graph = {_name(p): _top_level_imports(p) - {_name(p)} for p in MODULES}
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
    assert _top_level_imports(a) == {"boneage.models.registry", "boneage.io"}


def test_inference_imports_no_training_package():
    code = ("import sys, boneage.cli, boneage.inference.batch, boneage.inference.evaluate, boneage.inference.onnx, "
            "boneage.serve.app; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'catalyst', 'accelerate', 'tensorboard', 'matplotlib', 'boneage.training'}), "
            "'boneage.training' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "False"], done.stdout
