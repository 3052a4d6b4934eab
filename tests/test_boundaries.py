"""The runtime runs without torch and transformers; each part imports only what it may."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "artifacts": {"numpy"},
    "runtime": {"numpy", "onnxruntime", "tokenizers", "click", "jinja2"},
    # the serve extra: fate-serve's web layer, and constrained decoding (imported only when a grammar is asked for)
    "runtime/server": {"starlette", "uvicorn", "llguidance"},
    "compiler": {"numpy", "onnx", "torch", "transformers", "safetensors", "tokenizers", "click"},
    # the console scripts: standard library only, so a Ctrl-C at start-up is handled; click only once the
    # command's own module (which loads it) has been imported, to turn its usage errors into one line
    "entry": {"click"},
}
STDLIB = set(sys.stdlib_module_names)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


# The compiler reuses the runtime's pure helpers (positions, sessions, cache policies, slot allocation,
# predictors, memory, the layer-state contract) so that
# calibration sees exactly what the runtime computes; nothing else of the runtime.
# And the runtime itself where the compiler measures what a lossy mode it stored costs, end to end
# (export.int2_prefill_cost runs the finished artifact): model, options, offload, evaluate.
SHARED_RUNTIME = {"fate.runtime.model", "fate.runtime.experts.offload", "fate.runtime.evaluate", "fate.runtime.positions",
                  "fate.runtime.sessions", "fate.runtime.experts.eviction", "fate.runtime.experts.replay", "fate.runtime.memory",
                  "fate.runtime.experts.allocation", "fate.runtime.experts.predictors", "fate.runtime.state", "fate.runtime.clihelp",
                  "fate.runtime.options"}


SERVE_MODULES = {"server.py", "serve_cli.py", "grammar.py"}


def test_each_part_imports_only_what_it_may():
    for part, allowed in ALLOWED.items():
        if "/" in part:
            continue
        own = {f"fate.{part}", "fate.artifacts"} | (SHARED_RUNTIME if part == "compiler" else set())
        for path in (ROOT / part).rglob("*.py"):
            may = allowed | (ALLOWED["runtime/server"] if part == "runtime" and path.name in SERVE_MODULES else set())
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in STDLIB or top in may or any(name.startswith(p) for p in own):
                    continue
                raise AssertionError(f"{path.relative_to(ROOT)} imports {name}")


def test_generation_never_loads_torch_or_transformers(mixtral):
    code = f"""
import sys
from fate.runtime import Engine
engine = Engine.load({str(mixtral.artifact(4))!r})
engine.generate("hello", max_new_tokens=3)
engine.logits(engine.encode("hello"))
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors', 'onnx'))
print(bad)
sys.exit(1 if bad else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def import_graph(folder: Path) -> dict[str, set[str]]:
    """The folder's modules and the modules of the same folder each imports, at the top or inside a function."""
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        edges = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                edges.update([node.module] if node.module else [a.name for a in node.names])
    return graph


@pytest.mark.parametrize("folder", ["artifacts", "runtime/experts"])
def test_a_package_has_no_import_circle(folder):
    """artifacts/ and the expert room: every import between a package's modules goes one way."""
    graph = import_graph(ROOT / folder)
    seen, done = set(), set()

    def visit(module: str, trail: list[str]) -> None:
        assert module not in seen or module in done, f"import circle: {' -> '.join(trail + [module])}"
        if module in done:
            return
        seen.add(module)
        for other in sorted(graph.get(module, ())):
            visit(other, trail + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_expert_room_knows_nothing_of_graphs_or_tokens():
    """runtime/experts/ takes from the rest of the runtime only onnxruntime sessions and the native kernel."""
    may = {"sessions", "native"}
    for path in (ROOT / "runtime" / "experts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                taken = [node.module] if node.module else [a.name for a in node.names]
                assert set(taken) <= may, f"runtime/experts/{path.name} imports ..{taken}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fate.runtime"):
                assert node.module.startswith("fate.runtime.experts"), f"runtime/experts/{path.name} imports {node.module}"
