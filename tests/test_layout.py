"""The package's shape (docs/design.md, "Modules"): no import cycles, the model knows only jax and
flax, geometry nothing of the package, and loading a model for MD or ASE never reaches the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import child_env

PACKAGE = Path(__file__).resolve().parents[1] / "a2ijax"


def imports() -> dict[str, tuple[set[str], set[str]]]:
    """For every module: (package modules it imports, third-party top-level packages it imports)."""
    out = {}
    for path in PACKAGE.glob("*.py"):
        own, other = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] if node.module != "a2ijax" else [f"a2ijax.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "a2ijax" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").exists():
                    own.add(parts[1])
                elif parts[0] != "a2ijax":
                    other.add(parts[0])
        out[path.stem] = (own - {path.stem}, other)
    return out


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = imports()
    cycles = sorted(m for m in graph if m != "__init__" and m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_what_each_layer_may_know():
    graph = imports()
    # errors.py is a leaf with no imports: the one exception class of input errors, for every layer.
    assert graph["errors"] == (set(), set())
    assert graph["model"][0] <= {"errors"} and graph["model"][1] <= {"__future__", "dataclasses", "math", "typing",
                                                                    "flax", "jax"}
    assert graph["geometry"][0] <= {"errors"} and graph["geometry"][1] <= {"__future__", "itertools", "numpy"}
    for loader in ("checkpoint", "calculator", "trained_md", "md", "potential", "report", "pretrained", "committee",
                   "analysis"):
        reached = reachable(graph, loader) | {loader}
        assert "train" not in reached, f"{loader} reaches the trainer"
        assert not any("optax" in graph[m][1] for m in reached), f"{loader} imports optax"
    assert "optax" in graph["train"][1]  # the check above would pass vacuously if nothing named optax
    # Configuration is data: reading a TOML config reaches neither jax-md nor JAX's backend.
    assert not any("jax_md" in graph[m][1] for m in reachable(graph, "config") | {"config"})


def test_no_private_modules_of_dependencies():
    """jax-md's NequIP came from the private ``jax_md._nn``; only public modules may be imported
    (the one jax-md internal the package relies on, NeighborList's fields, is pinned in pyproject)."""
    private = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            private += [f"{path.name}: {n}" for n in names if any(p.startswith("_") for p in n.split(".")[1:])]
    assert not private, private


def test_import_a2ijax_gives_the_md_driver_without_starting_jax():
    """The README calls a2ijax.md.run after a bare ``import a2ijax`` (a fresh interpreter: no other
    test may have imported the submodule already). Importing the package, its CLI and
    ``a2ijax.parallel`` must not start JAX's backend (jax-md does when imported), or
    ``jax.distributed.initialize`` in ``a2ijax train --coordinator`` would come too late."""
    code = ("import a2ijax, a2ijax.cli, a2ijax.parallel; from jax._src import xla_bridge; "
            "assert not xla_bridge.backends_are_initialized(), 'the backend started on import'; "
            "assert callable(a2ijax.md.run) and callable(a2ijax.a2i_neighbor_list)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=child_env())
