"""Inside `service.api` too, imports point down (issue 26): each adapter (native /v1, oip /v2,
cds, pages) builds on `api/common` and on the packages below `api`, never on another adapter;
`common` knows no adapter; only the entry (`app`, `front`, the package root) sees them all.

`tests/test_package_layers.py` treats `service.api` as one node; this is its inner picture,
read the same static way (imports inside functions and under TYPE_CHECKING count).
"""

from __future__ import annotations

import ast
from pathlib import Path

from import_graph import Edge, module_edges, sources

import service

ADAPTERS = ("native", "oip", "cds", "pages")
ENTRY = ("service.api", "service.api.app", "service.api.front")


def _part(module: str) -> str:
    """'service.api.oip.infer' -> 'oip'; 'service.api.app' -> 'app'; outside api -> ''."""
    parts = module.split(".")
    if parts[:2] != ["service", "api"]:
        return ""
    return parts[2] if len(parts) > 2 else "api"


def _api_edges() -> list[Edge]:
    graph = module_edges(sources(Path(service.__file__).parent))
    return [e for e in graph if _part(e.module) and _part(e.target)]


def wrong_way(graph: list[Edge]) -> list[Edge]:
    """Edges inside api that break the picture above."""
    bad = []
    for e in graph:
        src, dst = _part(e.module), _part(e.target)
        if e.module in ENTRY or src == dst or e.target == "service.api":
            continue  # the root holds only a docstring; it is named for its templates/ folder
        if src in ADAPTERS and dst == "common":
            continue
        bad.append(e)
    return bad


def test_adapters_build_on_common_only() -> None:
    bad = wrong_way(_api_edges())
    assert bad == [], "imports inside service.api that run sideways or up:\n" + "\n".join(
        f"{e.module}:{e.line} imports {e.target}" for e in bad
    )


def test_the_check_sees_the_adapters_and_catches_a_sideways_import() -> None:
    """Not vacuous: real adapter -> common edges are present, and an adapter importing another
    adapter, or common importing an adapter, is reported."""
    root = ast.parse((Path(service.__file__).parent / "api" / "__init__.py").read_text())
    assert [type(n) for n in root.body] == [ast.Expr]  # why the root may be named freely
    graph = _api_edges()
    seen = {(_part(e.module), _part(e.target)) for e in graph}
    assert {(a, "common") for a in ADAPTERS} <= seen
    made_up = [
        Edge("api", "api", "service.api.oip.infer", "service.api.native.predict", 1),
        Edge("api", "api", "service.api.common.call", "service.api.pages.routes", 2),
    ]
    assert wrong_way(made_up) == made_up
