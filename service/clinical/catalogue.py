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

from service.clinical.mapping import Mapping, MappingError, load_dir, parse
from service.clinical.services import Service
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
        self._logged: set[tuple[str, tuple[str, ...]]] = set()  # clashes logged once
        self._clashed: set[str] = set()  # ids refused at the last look (offered())
        # The operator's mappings reserve their ids for their models, ready or not: no bundle
        # takes one over while its model is loading or broken.
        self._reserved: dict[str, str] = {}
        for m in mappings.values():
            for s in m.services:
                if s.id in self._reserved:
                    raise MappingError(
                        f"CDS service id '{s.id}' is used by the mappings of "
                        f"'{self._reserved[s.id]}' and '{m.model}'"
                    )
                self._reserved[s.id] = m.model

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
        """Each service id once. Bundle manifests bring their own mappings, so two models may
        name one id: a bundle could take over another model's service, and a call would reach
        the wrong model. An id in the operator's mapping directory stays its model's (offered
        while that model is ready, by no other model meanwhile); another id two models name is
        offered by neither. Each refusal is logged once, naming the models."""
        by_id: dict[str, list[Offered]] = {}
        for name in sorted({e.name for e in registry.entries() if e.ready}):
            model = registry.get(name)
            mapping = self.mapping_for(model)
            if mapping is None:
                continue
            for s in mapping.services:
                by_id.setdefault(s.id, []).append(Offered(s, mapping, model))
        out: list[Offered] = []
        clashed: set[str] = set()
        for service_id, claims in by_id.items():
            owner = self._reserved.get(service_id)
            if owner is not None:  # its model's, if ready (else find() says it is loading)
                out += [c for c in claims if c.model.name == owner]
                others = [c.model for c in claims if c.model.name != owner]
                if others:
                    self._clash(service_id, others, owner)
            elif len(claims) == 1:
                out.append(claims[0])
            else:
                clashed.add(service_id)
                self._clash(service_id, [c.model for c in claims], None)
        self._clashed = clashed
        return out

    def _clash(self, service_id: str, models: list[ServedModel], owner: str | None) -> None:
        key = (service_id, tuple(m.digest for m in models))
        if key in self._logged:
            return
        self._logged.add(key)
        names = ", ".join(f"'{m.name}' (version {m.version})" for m in models)
        reason = (
            f"CDS service id '{service_id}' belongs to model '{owner}' (the mapping directory); "
            f"the clinical mappings of {names} name it too and are not offered it"
            if owner is not None
            else f"CDS service id '{service_id}' is named by the clinical mappings of models "
            f"{names}; it is not offered until one of them takes another id"
        )
        log.error(
            "CDS service id named by several models",
            extra={"service": service_id, "models": [m.name for m in models], "reason": reason},
        )

    def find(self, service_id: str, registry: Registry) -> Offered:
        """The service, or 404; 503 while its model is known but not ready."""
        for o in self.offered(registry):
            if o.service.id == service_id:
                return o
        if service_id in self._clashed:
            raise ModelNotFoundError(
                f"CDS service '{service_id}' is named by the clinical mappings of several "
                "models and offered by none until one takes another id (the server's log "
                "names them); GET /cds-services lists the services offered"
            )
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
