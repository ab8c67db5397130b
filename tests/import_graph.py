"""The package-level import graph of `service`, read statically (layering tests).

Every import counts wherever it is written: at module level, inside a function (a lazy import
still runs upward when called) and under `if TYPE_CHECKING:` (the type still belongs to the
package above). A string that names a service module (PEP 562 lazy exports, a child started
with `python -m`) counts too. Nodes are the packages (`service.api` is one node, whatever its
inner layout) and the top-level modules (`settings`, `errors`, ...); `module_edges` gives the
module-level graph, with or without the imports under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = "service"


@dataclass(frozen=True)
class Edge:
    """`module` imports `target`: node `src` -> node `dst`."""

    src: str
    dst: str
    module: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({self.module}:{self.line} imports {self.target})"


def sources(package_dir: Path) -> dict[str, str]:
    """Dotted module name -> source text, for every .py file under the `service` directory."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text()
    return out


def node(module: str) -> str:
    """'service.api.v2' -> 'api', 'service.settings' -> 'settings', 'service' -> 'service'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never run)."""
    out: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            out.update(id(m) for stmt in n.body for m in ast.walk(stmt))
    return out


def _imports(module: str, tree: ast.Module, known: set[str]) -> Iterator[tuple[str, ast.AST]]:
    """(imported service module, node) for every import and module-naming string in `tree`."""
    package = module if f"{module}.__init__" in known else module.rpartition(".")[0]
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for alias in n.names:
                yield alias.name, n
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolved against this module's package
                up = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join([*up, base] if base else up)
            for alias in n.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), n
        elif isinstance(n, ast.Constant) and n.value in known and n.value != ROOT:
            yield n.value, n  # a module named as a string ("service" alone is a word)


def module_edges(modules: Mapping[str, str], *, runtime: bool = False) -> list[Edge]:
    """Every import of one service module by another (`src`/`dst` are the modules), each once;
    with ``runtime``, those under TYPE_CHECKING are left out."""
    known = set(modules) | {f"{m}.__init__" for m in modules if _is_package(m, modules)}
    found = set()
    for module, text in modules.items():
        tree = ast.parse(text)
        skip = _type_only(tree) if runtime else set()
        for target, n in _imports(module, tree, known):
            if target.startswith(ROOT + ".") and target != module and id(n) not in skip:
                found.add(Edge(module, target, module, target, getattr(n, "lineno", 0)))
    return sorted(found, key=lambda e: (e.module, e.line, e.target))


def edges(modules: Mapping[str, str]) -> list[Edge]:
    """Every import from one node to another (a module's own node is left out), each once."""
    graph = [
        Edge(node(e.module), node(e.target), e.module, e.target, e.line)
        for e in module_edges(modules)
    ]
    return [e for e in graph if e.src != e.dst]


def _is_package(module: str, modules: Mapping[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in modules)


def cycles(graph: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    succ: dict[str, set[str]] = {}
    for e in graph:
        succ.setdefault(e.src, set()).add(e.dst)
        succ.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
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
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return found
