"""The engine keeps the structure it was refactored into: no import circles (type-only imports count), and
no module reaching into another module's private fields (each piece of state has one owner)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "core" / "emllm"
EXTERNAL_PRIVATE = {"torch.ops.aten._scaled_dot_product_flash_attention_for_cpu"}  # torch's own CPU kernel


def _modules() -> dict[str, ast.Module]:
    return {
        path.relative_to(ENGINE).with_suffix("").as_posix().replace("/", "."): ast.parse(path.read_text())
        for path in ENGINE.rglob("*.py")
    }


def _relative_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package this one imports anywhere (module level, functions, TYPE_CHECKING)."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        candidates = [target] if node.module else [".".join([*base, alias.name]) for alias in node.names]
        found.update(c for c in candidates if c in known and c != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
    return cycles


def test_the_engine_has_no_import_circle() -> None:
    modules = _modules()
    graph = {name: _relative_imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert sum(len(edges) for edges in graph.values()) > 40  # the walk sees the package's imports
    assert _cycles(graph) == []


def test_a_circle_is_found_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_reaches_into_another_modules_private_fields() -> None:
    reached = []
    for name, tree in _modules().items():
        own = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _is_self(n.value)}
        own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {  # fields declared in a class body (dataclasses)
            t.id
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for n in c.body
            for t in ([n.target] if isinstance(n, ast.AnnAssign) else getattr(n, "targets", []))
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            if _is_self(node.value) or node.attr in own or ast.unparse(node) in EXTERNAL_PRIVATE:
                continue
            reached.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert reached == []


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")
