"""Any MLX device: MLX has float64 on the CPU only ("Arrays with type float64 only work with CPU
operations"), so every float64 array mixq makes must be made on the CPU stream. CI has no GPU;
this reads the source instead: each ``mx.float64`` must sit inside ``with mx.stream(mx.cpu)``."""

from __future__ import annotations

import ast
from pathlib import Path

MIXQ = Path(__file__).resolve().parents[1] / "mixq"


def is_cpu_stream(node: ast.With) -> bool:
    return any(ast.unparse(item.context_expr) == "mx.stream(mx.cpu)" for item in node.items)


def float64_outside_cpu_stream(tree: ast.AST) -> list[int]:
    """Line numbers of ``mx.float64`` not lexically inside a ``with mx.stream(mx.cpu)``."""
    found = []

    def walk(node: ast.AST, on_cpu: bool) -> None:
        on_cpu = on_cpu or (isinstance(node, ast.With) and is_cpu_stream(node))
        if isinstance(node, ast.Attribute) and ast.unparse(node) == "mx.float64" and not on_cpu:
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            walk(child, on_cpu)

    walk(tree, False)
    return found


def test_every_float64_array_is_made_on_the_cpu_stream():
    bad = {path.name: lines for path in sorted(MIXQ.glob("**/*.py"))
           if (lines := float64_outside_cpu_stream(ast.parse(path.read_text())))}
    assert not bad, f"mx.float64 outside `with mx.stream(mx.cpu)`: {bad}"


def test_the_check_sees_a_float64_on_the_default_stream():
    source = "import mlx.core as mx\nx = mx.zeros(3).astype(mx.float64)\n"
    assert float64_outside_cpu_stream(ast.parse(source)) == [2]
    inside = "with mx.stream(mx.cpu):\n    x = mx.zeros(3).astype(mx.float64)\n"
    assert float64_outside_cpu_stream(ast.parse(inside)) == []
