"""The package's layout (ARCHITECTURE.md): no module imports, at load time,
a module that imports it back; the per-op facts live in one table."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "onnx_fc2conv"


def _modules() -> dict:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.with_suffix("").relative_to(ROOT.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(mods: dict) -> dict:
    """Module -> the package modules it imports at module level."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            deps.update(subs or ([target] if target in mods else []))
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle():
    mods = _modules()
    graph = _imports(mods)
    graph["onnx_fc2conv"] = set()  # the package's own __init__ is what imports everything
    state: dict = {}

    def visit(n, path):
        state[n] = "open"
        for d in graph.get(n, ()):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_one_default_domain_test():
    offenders = [p.name for p in ROOT.rglob("*.py") if '("", "ai.onnx")' in p.read_text() and p.name != "graph.py"]
    assert offenders == []
