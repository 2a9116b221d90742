"""The package's layout (ARCHITECTURE.md): no module imports a module that
imports it back, not even through an import inside a function; the per-op
facts live in one table (ops.py)."""

import ast
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1] / "onnx_fc2conv"
# Imports inside these functions are not counted (none: every cycle is gone).
PENDING: set = set()


def _modules() -> dict:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.with_suffix("").relative_to(ROOT.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _import_nodes(name: str, tree: ast.Module):
    """Every relative import of a module: at its top and inside any function
    or class body (an import there runs later, but a cycle is still a cycle)."""
    skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and (name, f.name) in PENDING
            for n in ast.walk(f)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level and id(n) not in skip]


def _imports(mods: dict) -> dict:
    """Module -> the package modules it imports, anywhere in its body."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in _import_nodes(name, ast.parse(path.read_text())):
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            deps.update(subs or ([target] if target in mods else []))
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict) -> list | None:
    """One import cycle of ``graph`` as a path, or None."""
    state: dict = {}

    def visit(n, path):
        state[n] = "open"
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d, path + [d])
                if found:
                    return found
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _imports(_modules())
    graph["onnx_fc2conv"] = set()  # the package's own __init__ is what imports everything
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_an_import_inside_a_function(tmp_path):
    """The check must be able to fail: a lazy import back is a cycle."""
    a = ast.parse("from . import b\n")
    b = ast.parse("def f():\n    from . import a\n")
    graph = {}
    for name, tree in (("p.a", a), ("p.b", b)):
        graph[name] = {f"p.{al.name}" for n in _import_nodes(name, tree) for al in n.names}
    assert _cycle(graph) == ["p.a", "p.b", "p.a"]


def test_ops_is_a_floor():
    """ops.py imports nothing of the package, so any module may read the table."""
    assert _imports(_modules())["onnx_fc2conv.ops"] == set()


def test_one_default_domain_test():
    offenders = [p.name for p in ROOT.rglob("*.py") if '("", "ai.onnx")' in p.read_text() and p.name != "ops.py"]
    assert offenders == []


def _op_names(value) -> set:
    """The ONNX op names a module-level set, frozenset, tuple or dict literal holds."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "frozenset" and value.args:
        value = value.args[0]
    elts = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", None)
    if not elts:
        return set()
    names = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return {n for n in names if onnx.defs.has(n)}


def test_op_sets_live_in_ops():
    """A module-level set of ONNX op names anywhere but ops.py is a per-op
    fact out of its table (ARCHITECTURE.md: one entry in ops.py)."""
    found = []
    for path in ROOT.rglob("*.py"):
        if path.name == "ops.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(_op_names(node.value)) >= 2:
                found.append(f"{path.relative_to(ROOT)}: {ast.unparse(node.targets[0])}")
    assert found == []
