"""The shape of the package: the import-linter contracts of pyproject.toml hold (layers; gradio only in the UI),
no module takes part in an import cycle, and imports inside functions say why they are there."""
import ast
from pathlib import Path

import grimp
from importlinter import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quailora_app"


def test_import_contracts_hold(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a directed graph {node: successors}."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            out.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_strongly_connected_finds_a_cycle():
    components = strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert {frozenset(c) for c in components} == {frozenset("abc"), frozenset("d")}


def import_edges() -> dict[str, set[str]]:
    """module -> the package modules importing it runs: its imports (those inside functions included) and, since
    importing a.b.c first runs a/__init__ and a/b/__init__, the packages above each of them."""
    graph = grimp.build_graph("quailora_app")
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        targets = {i for i in graph.find_modules_directly_imported_by(module) if i.startswith("quailora_app")}
        edges[module] = {ancestor for target in targets for ancestor in with_packages(target)} - {module}
    return edges


def with_packages(module: str) -> set[str]:
    """`module` and every package above it ("a.b.c" -> {"a", "a.b", "a.b.c"})."""
    parts = module.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts) + 1)}


def test_no_import_cycles():
    """Every import counts, those inside functions and the packages' __init__ included: a package whose __init__
    imports one of its modules that imports back into the package is a cycle."""
    cycles = [sorted(c) for c in strongly_connected(import_edges()) if len(c) > 1]
    assert cycles == []


def test_a_package_init_importing_its_module_is_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "toy_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from toy_pkg.sub import leaf\n")  # registers leaf
    (package / "sub" / "registry.py").write_text("")
    (package / "sub" / "leaf.py").write_text("from toy_pkg import config\n")
    (package / "config.py").write_text("from toy_pkg.sub.registry import *\n")  # runs sub/__init__ first
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("toy_pkg")
    edges = {m: {a for i in graph.find_modules_directly_imported_by(m) for a in with_packages(i)} - {m}
             for m in graph.modules}
    assert {"toy_pkg.config", "toy_pkg.sub", "toy_pkg.sub.leaf"} in [c for c in strongly_connected(edges) if len(c) > 1]


def test_no_module_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}


def local_imports_without_reason(path: Path) -> list[str]:
    """Import statements inside functions with no comment on their lines or on the line above."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                here = "\n".join(lines[inner.lineno - 1:inner.end_lineno])
                above = lines[inner.lineno - 2] if inner.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    found.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    return sorted(set(found))


def test_imports_inside_functions_say_why():
    missing = [line for path in sorted(PACKAGE.rglob("*.py")) for line in local_imports_without_reason(path)]
    assert missing == []


def private_uses(tree: ast.AST) -> list[str]:
    """`from quailora_app.x import _name` and `alias._name` where alias is a module of the package: another module's
    private name (dunders aside)."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quailora_app"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                elif (PACKAGE.parent / (node.module.replace(".", "/") + "/" + alias.name + ".py")).is_file():
                    modules.add(alias.asname or alias.name)  # a module imported by name: `from pkg import mod as M`
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("quailora_app"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_private_uses_are_found():
    tree = ast.parse("from quailora_app.sources.data import _read, ok\nfrom quailora_app.plots import figures as F\n"
                     "F._median([1])\nF.median([1])\n")
    assert private_uses(tree) == ["from quailora_app.sources.data import _read", "F._median"]


def test_no_module_uses_another_modules_private_names():
    offenders = {str(path.relative_to(ROOT)): uses for path in sorted(PACKAGE.rglob("*.py"))
                 if (uses := private_uses(ast.parse(path.read_text())))}
    assert not offenders, offenders
