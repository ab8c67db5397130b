"""What a hook call's FHIR data gave: each feature's quantity as read (or derived) and the
resources it came from (extraction.py reads them; cards.py shows them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.errors import MissingDataError


@dataclass(frozen=True)
class Used:
    """One quantity as read (or derived), for the card's table and the resource's basis."""

    name: str
    title: str
    value: float
    unit: str
    date: str | None = None  # as given in the resource
    source: str | None = None  # "Observation/abc", "Patient/1"; None when derived
    code: str | None = None  # "LOINC 2085-9"
    given: str | None = None  # the value and unit as sent, when converted
    formula: str | None = None  # derived: e.g. "tc / hdl"


@dataclass
class Extraction:
    patient: str  # "Patient/<id>"
    used: dict[str, Used] = field(default_factory=dict)
    # Results of a needed code that were not read (dated ahead, no readable time), with why:
    # shown on the card when an older result was used instead.
    skipped: list[str] = field(default_factory=list)

    def features(
        self, names: list[str], ranges: list[tuple[float, float]] | None = None
    ) -> list[float]:
        """The values in `names` order; MissingDataError (not KeyError, a 500) for any not read.

        A mapping that fits its model (`fit.py`) leaves none out: this is the last guard. With
        `ranges` (the model's valid range per feature), a value outside its range is refused."""
        missing = [n for n in names if n not in self.used]
        if missing:
            raise MissingDataError(
                f"needed data is missing: no value for {', '.join(missing)}",
                [
                    {
                        "severity": "error",
                        "code": "required",
                        "details": {"text": n},
                        "diagnostics": f"{n}: no value was read or derived for this feature",
                    }
                    for n in missing
                ],
            )
        values = [self.used[n].value for n in names]
        if ranges:
            self._check_ranges(names, ranges)
        return values

    def _check_ranges(self, names: list[str], ranges: list[tuple[float, float]]) -> None:
        """A value outside the model's valid range is unusable input, said with the resource it
        came from (the engine's check said only "instance 0, feature 'glu'": a bare 400)."""
        issues: list[dict[str, Any]] = []
        for n, (lo, hi) in zip(names, ranges, strict=True):
            u = self.used[n]
            if lo <= u.value <= hi:
                continue
            came = f"{u.source} ({u.code})" if u.source and u.code else u.source or "the data"
            shown = u.given or f"{u.value:g} {u.unit}"
            if u.formula:
                came, shown = f"{u.formula} from the results", f"{u.value:g} {u.unit}"
            issues.append(
                {
                    "severity": "error",
                    "code": "value",
                    "details": {"text": u.title},
                    "diagnostics": f"{u.title}: {came} gives {shown}, outside the model's valid "
                    f"range [{lo:g}, {hi:g}] {u.unit}; check the result and its unit",
                }
            )
        if issues:
            raise MissingDataError(
                "unusable input: " + "; ".join(str(i["diagnostics"]) for i in issues), issues
            )

    def basis(self) -> list[str]:
        """References of the resources read, the Patient first, each once."""
        refs = [self.patient] if any(u.source == self.patient for u in self.used.values()) else []
        for u in self.used.values():
            if u.source and u.source not in refs:
                refs.append(u.source)
        return refs
