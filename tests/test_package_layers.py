"""Packages import only downward (docs/ARCHITECTURE.md): no cycle, no arrow up.

Static: every module of `service` is parsed with `ast` (imports inside functions and under
TYPE_CHECKING included), so the check takes well under a second and needs nothing importable.
"""

from __future__ import annotations

from pathlib import Path

from import_graph import Edge, cycles, edges, module_edges, sources

import service

# Top first. A node may import only nodes of layers below its own; nodes of one layer do not
# import each other. Keep in step with docs/ARCHITECTURE.md.
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),  # the command line: every command, so everything below
    ("server", "settings_check"),  # uvicorn process; what is wrong with settings before it
    ("api",),  # HTTP adapters (native, OIP, CDS Hooks, pages): one node, whatever its layout
    ("audit", "clinical", "training"),
    ("calibration",),  # fitting and evaluating calibration (training calibrates what it trains)
    ("encode", "metrics", "packaging"),  # answers as JSON / as Prometheus series; writing bundles
    ("engine",),  # serving: sampler, batcher, registry, and calibration as applied at serve time
    ("bundle", "json_body"),  # the format as data; a request body as JSON parsers read it
    ("child", "connections", "errors", "logs", "nn", "settings"),  # ground: no service import
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _graph() -> list[Edge]:
    return edges(sources(Path(service.__file__).parent))


def upward(graph: list[Edge]) -> list[Edge]:
    """Edges that do not point to a lower layer (same layer or above)."""
    return [e for e in graph if RANK[e.src] >= RANK[e.dst]]


def test_no_cycle_between_packages() -> None:
    graph = _graph()
    found = cycles(graph)
    inside = [str(e) for e in graph if any({e.src, e.dst} <= set(c) for c in found)]
    assert found == [], f"packages that import each other: {found}; edges:\n" + "\n".join(inside)


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Within a package too: a function-level import that dodges a cycle still closes it when it
    runs. Only annotations under TYPE_CHECKING (never run) may point back."""
    graph = module_edges(sources(Path(service.__file__).parent), runtime=True)
    found = cycles(graph)
    inside = [str(e) for e in graph if any({e.src, e.dst} <= set(c) for c in found)]
    assert found == [], f"modules that import each other: {found}; edges:\n" + "\n".join(inside)


def test_every_import_points_down() -> None:
    graph = _graph()
    undeclared = sorted({n for e in graph for n in (e.src, e.dst)} - set(RANK))
    assert undeclared == [], f"{undeclared}: give them a layer in LAYERS and docs/ARCHITECTURE.md"
    bad = upward(graph)
    assert bad == [], "imports that do not point down (LAYERS, top first):\n" + "\n".join(
        f"{e}: layer {RANK[e.src]} -> layer {RANK[e.dst]}" for e in bad
    )


def test_every_top_level_module_and_package_has_a_layer() -> None:
    root = Path(service.__file__).parent
    names = {p.stem for p in root.glob("*.py")} | {
        p.parent.name for p in root.glob("*/__init__.py")
    }
    assert names - {"__init__"} == set(RANK)


def test_the_package_root_imports_nothing() -> None:
    """`service/__init__.py` runs before every module of every layer."""
    assert [e for e in _graph() if e.module == "service"] == []


def test_the_graph_sees_what_the_layers_rely_on() -> None:
    """Not vacuous: known arrows are found, lazy and type-only ones included."""
    graph = {(e.module, e.target) for e in _graph()}
    assert ("service.engine.model", "service.bundle.load") in graph  # module level
    assert ("service.cli", "service.calibration.recalibration") in graph  # inside a function
    assert ("service.audit.cli", "service.settings") in graph  # inside a function
    assert ("service.bundle.load", "service.settings") in graph  # under TYPE_CHECKING
    assert ("service.api.native.predict", "service.encode") in graph


FIXTURE = {
    "service": "",
    "service.errors": "",
    "service.engine": "",
    "service.engine.model": "from service.bundle.load import load\n",
    "service.bundle": "",
    "service.bundle.load": "from .manifest import Manifest\n",
    "service.bundle.manifest": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..errors import Oops\n"
        "def write():\n"
        "    from service.engine import graph\n"
        "LAZY = {'x': 'service.engine.model'}\n"
    ),
}


def test_the_checker_reports_cycles_and_upward_edges_with_their_module() -> None:
    graph = edges(FIXTURE)
    got = {(e.src, e.dst, e.module, e.target, e.line) for e in graph}
    assert got == {
        ("engine", "bundle", "service.engine.model", "service.bundle.load", 1),
        ("bundle", "errors", "service.bundle.manifest", "service.errors", 3),
        ("bundle", "engine", "service.bundle.manifest", "service.engine", 5),
        ("bundle", "engine", "service.bundle.manifest", "service.engine.model", 6),
    }
    assert cycles(graph) == [["bundle", "engine"]]
    runtime = {(e.module, e.target) for e in module_edges(FIXTURE, runtime=True)}
    assert ("service.bundle.manifest", "service.errors") not in runtime  # TYPE_CHECKING only
    assert ("service.bundle.manifest", "service.engine") in runtime  # in a function: it runs
    assert [str(e) for e in upward(graph) if e.src == "bundle" and e.dst == "engine"] == [
        "bundle -> engine (service.bundle.manifest:5 imports service.engine)",
        "bundle -> engine (service.bundle.manifest:6 imports service.engine.model)",
    ]
