"""Model bundles: a versioned manifest plus code-free artifacts (see docs/BUNDLES.md).

Exports load lazily (PEP 562): `service.bundle.architecture` needs only torch, so a bare GPU
machine without pydantic can still rebuild a bundle's module. Writing a bundle from a user's
module is `service.packaging.save`: it traces and checks with the engine, which sits above.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type checker sees the real names; runtime imports them on first use
    from service.bundle.load import LoadedBundle, TrustPolicy, bundle_digest, load_bundle
    from service.bundle.manifest import SCHEMA_VERSION, Manifest, parse_manifest

_EXPORTS = {
    "LoadedBundle": "service.bundle.load",
    "TrustPolicy": "service.bundle.load",
    "bundle_digest": "service.bundle.load",
    "load_bundle": "service.bundle.load",
    "SCHEMA_VERSION": "service.bundle.manifest",
    "Manifest": "service.bundle.manifest",
    "parse_manifest": "service.bundle.manifest",
}
__all__ = [
    "SCHEMA_VERSION",
    "LoadedBundle",
    "Manifest",
    "TrustPolicy",
    "bundle_digest",
    "load_bundle",
    "parse_manifest",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'service.bundle' has no attribute {name!r}")
