"""The CDS services offered: one per service of each mapping whose model is loaded and fits.

Mappings come from a directory (`<model_dir>/clinical/*.json` by default) and from bundle
manifests (`clinical` section), the manifest winning: it is versioned with the model. A service
is offered while its model has a ready version (the newest ready one answers, as on /v1) whose
features the mapping covers; a mapping that does not fit is logged once and not offered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.clinical.mapping import Mapping, MappingError, Service, load_dir, parse
from service.engine.model import ServedModel
from service.engine.registry import Registry
from service.errors import ModelNotFoundError

log = logging.getLogger("mcserve.cds")

USAGE = (
    "Send a JWT signed by an allowlisted issuer. Prefetch is expected: the service queries "
    "only FHIR servers configured for the issuer; data still missing or too old get an info "
    "card naming them."
)

EXTENSION = "example.mcserve.model"  # discovery: the model behind a service (namespaced key)


@dataclass(frozen=True)
class Offered:
    service: Service
    mapping: Mapping
    model: ServedModel


class Catalogue:
    def __init__(self, mappings: dict[str, Mapping]) -> None:
        self.mappings = mappings
        self._fit: dict[str, Mapping | None] = {}  # by bundle digest
        seen: dict[str, str] = {}
        for m in mappings.values():
            for s in m.services:
                if s.id in seen:
                    raise MappingError(
                        f"CDS service id '{s.id}' is used by the mappings of '{seen[s.id]}' and "
                        f"'{m.model}'"
                    )
                seen[s.id] = m.model

    @classmethod
    def load(cls, root: Path) -> Catalogue:
        mappings, problems = load_dir(root)
        for p in problems:
            log.error("clinical mapping refused", extra={"reason": p})
        log.info("clinical mappings", extra={"dir": str(root), "models": sorted(mappings)})
        return cls(mappings)

    def mapping_for(self, model: ServedModel) -> Mapping | None:
        """The mapping that feeds this model version, or None (the reason logged once)."""
        if model.digest in self._fit:
            return self._fit[model.digest]
        section = model.manifest.clinical
        mapping: Mapping | None = None
        problems: list[str] = []
        if section is not None:
            try:
                mapping = parse(dict(section), f"{model.name}/{model.version} manifest")
            except MappingError as exc:
                problems.append(str(exc))
        else:
            mapping = self.mappings.get(model.name)
        if mapping is not None:
            problems += mapping.problems(model.manifest)
        if problems:
            log.error(
                "clinical mapping does not fit the model; its CDS services are not offered",
                extra={"model": model.name, "version": model.version, "reasons": problems},
            )
            mapping = None
        self._fit[model.digest] = mapping
        return mapping

    def offered(self, registry: Registry) -> list[Offered]:
        out = []
        for name in sorted({e.name for e in registry.entries() if e.ready}):
            model = registry.get(name)
            mapping = self.mapping_for(model)
            if mapping is not None:
                out += [Offered(s, mapping, model) for s in mapping.services]
        return out

    def find(self, service_id: str, registry: Registry) -> Offered:
        """The service, or 404; 503 while its model is known but not ready."""
        for o in self.offered(registry):
            if o.service.id == service_id:
                return o
        for m in self.mappings.values():
            if any(s.id == service_id for s in m.services) and registry.versions(m.model):
                registry.get(m.model)  # raises ModelNotReadyError when loading or broken
        raise ModelNotFoundError(
            f"no CDS service '{service_id}' is offered; GET /cds-services lists them"
        )

    def discovery(self, registry: Registry) -> dict[str, Any]:
        return {
            "services": [
                {
                    "hook": o.service.hook,
                    "title": o.service.title,
                    "description": o.service.description,
                    "id": o.service.id,
                    "prefetch": o.mapping.prefetch(),
                    "usageRequirements": USAGE,
                    # The model behind the service, as an extension: CDS Hooks has no field for
                    # it (a `version` there would claim to version the service definition).
                    "extension": {EXTENSION: {"model": o.model.name, "version": o.model.version}},
                }
                for o in self.offered(registry)
            ]
        }
