"""The package layout: stages orchestrate, quantization math and flows below them, no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "qlab"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """qlab module -> the qlab modules it imports anywhere in its file (functions included)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlab"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("qlab")]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = _imports()
    assert "qlab.stages.int8" in graph and "qlab.quant.flows.eager" in graph
    # a package's __init__ may re-export its submodules; the submodules must not need it back
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and graph.get(t, set()) >= {m})}
             for m, ts in graph.items()}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_quantization_code_does_not_reach_up_into_the_stages():
    graph = _imports()
    below = [m for m in graph if m.startswith(("qlab.quant", "qlab.integer", "qlab.models",
                                               "qlab.hardware", "qlab.artifacts"))]
    for m in below:
        assert not {t for t in graph[m] if t.startswith("qlab.stages")}, m


def test_importing_artifacts_does_not_load_matplotlib():
    """Only the functions that plot import matplotlib: loading INT8 models stays light."""
    code = "import qlab.artifacts, sys; assert 'matplotlib' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# Packages from the top down: a module may import its own layer and the layers below it only.
LAYERS = [
    ("stages", ("qlab.stages", "qlab.cli")),
    ("flows", ("qlab.quant.flows",)),
    ("quantization math", ("qlab.quant",)),
    ("integer model", ("qlab.integer",)),
]


def _layer(module: str) -> int:
    for depth, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    return len(LAYERS)  # models, data, hardware, artifacts, runtimes, ...: the base


def test_packages_import_only_downwards():
    graph = _imports()
    assert _layer("qlab.quant.flows.eager") == 1 and _layer("qlab.integer.verify") == 3
    upward = [f"{m} ({LAYERS[_layer(m)][0] if _layer(m) < len(LAYERS) else 'base'}) imports {t} "
              f"({LAYERS[_layer(t)][0]})"
              for m, targets in graph.items() for t in sorted(targets)
              if _layer(t) < _layer(m)]
    assert not upward, "\n".join(upward)
