"""Model bundles: a versioned manifest plus code-free artifacts (see docs/BUNDLES.md)."""

from service.bundle.load import LoadedBundle, TrustPolicy, bundle_digest, load_bundle
from service.bundle.manifest import SCHEMA_VERSION, Manifest, parse_manifest
from service.bundle.save import save

__all__ = [
    "SCHEMA_VERSION",
    "LoadedBundle",
    "Manifest",
    "TrustPolicy",
    "bundle_digest",
    "load_bundle",
    "parse_manifest",
    "save",
]
