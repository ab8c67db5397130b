"""Whether a clinical mapping fits the model version it is to feed (its bundle manifest).

Checked where the mapping meets its model (`Mapping.problems`, called by the catalogue for
each model version), since a mapping file names a model but not its version:
- every feature has a quantity, and never one that may be silently absent: an `optional`
  observation (or a derivation from one) raises no issue when missing, so the model got no
  value and every call was a KeyError (a 500);
- a feature's unit in the mapping is the model's input unit (manifest `inputs.units`) where
  both are UCUM codes: a mapping in mmol/L feeding a model trained in mg/dL is refused, rather
  than every value being 38.67 times too small;
- a classifier's outcome is one of its labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bundle.manifest import Manifest
from service.clinical import ucum

if TYPE_CHECKING:
    from service.clinical.mapping import Mapping

SAME = 1e-6  # relative: units whose factor is further from 1 are not the same unit


def problems(mapping: Mapping, manifest: Manifest) -> list[str]:
    """Why `mapping` cannot feed `manifest`'s model (empty when it can)."""
    out = []
    features = manifest.inputs.feature_names
    if features is None:
        return [f"model '{manifest.name}' has no feature names to map to"]
    known = set(mapping.quantities())
    missing = [f for f in features if f not in known]
    if missing:
        out.append(f"no source for feature(s) {missing}")
    out += [p for f in features if f in known for p in _optional(mapping, f)]
    # The mapping's unit per quantity: observations' UCUM codes, derived ones' (often text).
    mine = {d.name: d.unit for d in mapping.derived}
    mine |= {o.name: o.unit for o in mapping.observations}
    units = manifest.inputs.units or []
    out += [
        p
        for f, unit in zip(features, units, strict=False)
        if f in mine and unit
        for p in _unit(f, mine[f], unit)
    ]
    if manifest.task == "classification":
        labels = manifest.outputs.labels or []
        if mapping.outcome not in labels:
            out.append(f"outcome {mapping.outcome!r} is not one of the labels {labels}")
    elif mapping.outcome is not None:
        out.append("a regression model has no outcome label")
    return out


def optional_sources(mapping: Mapping, name: str) -> list[str]:
    """The optional observations `name` is (or is derived from), in mapping order."""
    optional = {o.name for o in mapping.observations if o.optional}
    derived = {d.name: d for d in mapping.derived}
    found: set[str] = set()
    todo, seen = [name], set()
    while todo:  # derived entries name earlier quantities only: no cycles, but shared inputs
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in optional:
            found.add(n)
        if n in derived:
            todo += derived[n].args
    return [o.name for o in mapping.observations if o.name in found]


def _optional(mapping: Mapping, feature: str) -> list[str]:
    used = optional_sources(mapping, feature)
    if not used:
        return []
    if used == [feature]:
        return [
            f"feature '{feature}' is an optional observation: a missing one raises no issue, "
            f"so the model would get no value; remove `optional` from '{feature}' (it is for "
            "the arguments of a fallback)"
        ]
    return [
        f"feature '{feature}' is derived from the optional observation(s) {used}: a missing "
        "one raises no issue, so the model would get no value; remove `optional` from them"
    ]


def _unit(feature: str, mine: str, model_unit: str) -> list[str]:
    try:
        ucum.parse(mine)
        ucum.parse(model_unit)
    except ucum.UnitError:
        return []  # one of them is text ("years", "ln(mg/dL)"): nothing to compare
    try:
        f: float | None = ucum.factor(mine, model_unit)
    except ucum.UnitError:
        f = None
    if f is not None and abs(f - 1) <= SAME:
        return []
    how = (
        "do not convert into each other"
        if f is None
        else f"differ (1 {mine} = {f:.7g} {model_unit})"
    )
    return [
        f"feature '{feature}': the mapping's unit {mine!r} and the model's input unit "
        f"{model_unit!r} (manifest inputs.units) {how}; give the mapping the model's unit "
        f"{model_unit!r} (results in other units are converted to it)"
    ]
