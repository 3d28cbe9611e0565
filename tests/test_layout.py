"""The package's layout holds: imports point down the layers of docs/architecture.md, and no module imports itself
back through others (no cycle), counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "haskd"

# Lower number = lower layer; a module may import its own layer or lower ones (docs/architecture.md).
LAYERS = {
    "errors": 0, "io": 0, "classes": 0, "progress": 0, "threads": 0,
    "data": 1,
    "images": 2, "sparse": 2,
    "models": 3,
    "config": 4,
    "engine": 5,
    "distill": 6, "prepare": 6,
    "workflow": 7,
    "bench": 8,
    "commands": 9, "cli": 9, "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the haskd modules it imports (``from x import y`` counts ``x.y`` when that is a module)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else "haskd"
    return top, LAYERS.get(top, 10)


def test_every_top_level_part_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops <= set(LAYERS), f"give these a layer here and in docs/architecture.md: {sorted(tops - set(LAYERS))}"


def test_imports_point_down():
    upward = []
    for module, targets in _import_graph().items():
        if module == "haskd":  # the package's own __init__ re-exports the public API
            continue
        for target in targets:
            (top, layer), (ttop, tlayer) = _layer(module), _layer(target)
            if tlayer > layer:
                upward.append(f"{module} -> {target} ({top} {layer} imports {ttop} {tlayer})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
