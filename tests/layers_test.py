"""The package's layers (clae_tf/__init__.py): imports point only down, and no module imports
itself back through another. Read from the source with ast, so an upward import fails here before
any test of behaviour runs."""

import ast
import os

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "clae_tf")
# Each layer and the layers it may import (besides itself and clae_tf's ClaeError).
ALLOWED = {
    "runtime": set(),
    "data": {"runtime"},
    "method": {"runtime"},
    "evaluation": {"runtime", "data", "method"},
    "job": {"runtime", "data", "method", "evaluation"},
}


def _modules():
    """{dotted module name: path} of every module of clae_tf."""
    out = {}
    for root, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path):
    """The clae_tf modules that the file at `path` imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "clae_tf"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "clae_tf":
                continue
            for alias in node.names:  # `from pkg import module` names a module; else the package
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m != "clae_tf" and _layer(m) is None]
    assert loose == [], "modules outside the layers of clae_tf/__init__.py"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_point_down(module):
    layer = _layer(module)
    upward = [m for m in _imports(MODULES[module])
              if _layer(m) not in (None, layer) and _layer(m) not in ALLOWED[layer]]
    assert upward == [], f"{module} ({layer}/) imports from a layer that is not below it"


def test_no_import_cycle():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m and not m.startswith(i + ".")}
             for m, p in MODULES.items()}
    graph = {m: {i for i in deps if i != "clae_tf"} for m, deps in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path):
    # The rule itself, on a file that imports upward: the test above would fail for it.
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from clae_tf.job import app\n"
                    "    from clae_tf import ClaeError\n")
    assert _imports(str(path)) == {"clae_tf.job.app", "clae_tf"}
    assert "job" not in ALLOWED["method"]
