"""A clinical mapping: how FHIR data (Patient, Observations) becomes one model's features.

A mapping is JSON (`<model_dir>/clinical/<model>.json`, or a bundle manifest's `clinical`
section, which wins because it is versioned with the bundle). It names *quantities*: each comes
from the Patient (age, administrative gender), from the latest Observation of some codes
(converted to one unit), or is derived from other quantities (`ln`, `ratio`). Every model
feature must be one quantity; other quantities are intermediates (e.g. triglycerides in mg/dL,
whose log is the feature). The CDS services, their discovery prefetch templates and the
assumptions shown to clinicians are part of the same file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from service.bundle.manifest import Manifest
from service.clinical import fit, ucum
from service.clinical.services import Service
from service.clinical.terms import Capped, Code, Concept, Strict, capped, query_problem

PATIENT_KEY = "patient"
STATUSES = ("final", "amended", "corrected")  # the Observation statuses read
SPARE = 2  # results a prefetch template asks for beyond one per concept (Mapping.prefetch)
AGREE = 1e-6  # relative: a listed unit factor further from UCUM's is a typo, not rounding


class Fallback(Strict):
    """A standard derivation of a quantity from others, used when its own result is unusable.

    `mean_arterial`: (systolic + 2 x diastolic) / 3; `bmi`: weight / height^2. The arguments are
    observation sources (usually `optional`), converted to the quantity's unit by UCUM.
    """

    op: Literal["mean_arterial", "bmi"]
    args: list[str] = Field(min_length=2, max_length=2)

    def formula(self) -> str:
        a, b = self.args
        return f"({a} + 2 {b}) / 3" if self.op == "mean_arterial" else f"{a} / {b}^2"


class ObservationSource(Strict):
    """The latest Observation with one of `codes`, its valueQuantity converted to `unit`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_. -]{1,64}$")  # a feature name, or an intermediate
    title: str = Field(min_length=1)
    codes: Capped[Code] = Field(min_length=1)  # a value set: any of them
    # Panels whose components carry the value (e.g. LOINC 85354-9, the blood-pressure panel):
    # asked for in the prefetch too, since a FHIR search by `code` sees no component codes.
    panels: Capped[Code] = Field(default_factory=list)
    optional: bool = False  # only an argument of a fallback: its absence alone is no problem
    otherwise: Fallback | None = None
    unit: str = Field(min_length=1)  # UCUM code of the value the model takes
    # Any UCUM unit commensurable with `unit` is converted (service/clinical/ucum.py); mass and
    # substance concentrations into each other with `molar_mass` (g/mol). `units` lists exact
    # codes with their own factor to `unit` (value x factor); a dimensionless `unit` (whose
    # meaning is in its annotation, e.g. {a.u.}) accepts only those. An Observation whose
    # quantity has no unit is read as "1".
    units: Annotated[dict[str, float], capped] = Field(default_factory=dict)
    molar_mass: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    max_age_days: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)  # or mapping's
    prefetch: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # key; def. name

    @model_validator(mode="after")
    def _units(self) -> ObservationSource:
        try:
            target = ucum.parse(self.unit)
            for code in self.units:
                ucum.parse(code)
        except ucum.UnitError as exc:
            raise ValueError(f"observation '{self.name}': {exc}") from None
        if not target.dims and not self.units:
            raise ValueError(
                f"observation '{self.name}': the unit {self.unit!r} is dimensionless; list the "
                "accepted codes in `units` (UCUM cannot tell one arbitrary scale from another)"
            )
        for code, f in self.units.items():
            self._factor_agrees(code, f)
        return self

    def _factor_agrees(self, code: str, f: float) -> None:
        """A listed factor is finite, > 0 and, where UCUM can compute it, UCUM's."""
        where = f"observation '{self.name}': units[{code!r}] = {f!r}"
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"{where}: a unit's factor must be a finite number > 0")
        if "{" in code + self.unit:
            return  # an annotation names an arbitrary scale: UCUM reads it as 1, not as its own
        try:
            want = ucum.factor(code, self.unit, self.molar_mass)
        except ucum.UnitError:
            return  # UCUM cannot convert it: the listed factor is the only one
        if abs(f - want) > AGREE * want:
            raise ValueError(
                f"{where}, but UCUM converts {code} to {self.unit} with the factor {want:.7g}: "
                "correct the factor, or remove the entry (UCUM converts that unit by itself)"
            )

    @model_validator(mode="after")
    def _queryable(self) -> ObservationSource:
        # Codes and systems go into discovery's prefetch query unescaped (mapping.prefetch).
        for field, codes in (("codes", self.codes), ("panels", self.panels)):
            for j, c in enumerate(codes):
                for part, value in (("system", c.system), ("code", c.code)):
                    why = query_problem(value)
                    if why:
                        raise ValueError(f"observation '{self.name}': {field}[{j}].{part} {why}")
        return self

    @property
    def key(self) -> str:
        return self.prefetch or self.name

    def factor(self, unit: str) -> float:
        """value x factor is in `self.unit`; UnitError says why a unit is refused."""
        if unit in self.units:
            return self.units[unit]
        if not ucum.parse(self.unit).dims:
            listed = ", ".join(repr(u) for u in self.units)
            raise ucum.UnitError(f"{unit!r} is not one of the listed units ({listed})")
        return ucum.factor(unit, self.unit, self.molar_mass)


class Derived(Strict):
    """`ln`: natural log of one quantity; `ratio`: the first quantity over the second."""

    name: str = Field(pattern=r"^[A-Za-z0-9_. -]{1,64}$")
    title: str = Field(min_length=1)
    op: Literal["ln", "ratio"]
    args: list[str] = Field(min_length=1, max_length=2)
    unit: str = Field(min_length=1)  # as shown to clinicians, e.g. "ln(mg/dL)"; UCUM or text

    @model_validator(mode="after")
    def _arity(self) -> Derived:
        want = 1 if self.op == "ln" else 2
        if len(self.args) != want:
            raise ValueError(f"derived '{self.name}': {self.op} takes {want} argument(s)")
        return self

    def formula(self) -> str:
        if self.op == "ln":
            return f"ln({self.args[0]})"
        return f"{self.args[0]} / {self.args[1]}"


class PatientSource(Strict):
    age: str | None = None  # quantity name: whole years at the hook's time, from birthDate
    gender: str | None = None  # quantity name: administrative gender mapped by `gender_codes`
    gender_codes: Annotated[dict[str, float], capped] = Field(default_factory=dict)  # -> number
    gender_coding: str | None = None  # the documented code the numbers follow (ISO/IEC 5218)

    @model_validator(mode="after")
    def _codes(self) -> PatientSource:
        if self.gender is not None and not self.gender_codes:
            raise ValueError("patient.gender needs gender_codes")
        unknown = set(self.gender_codes) - {"male", "female", "other", "unknown"}
        if unknown:
            raise ValueError(f"gender_codes: {sorted(unknown)} are not FHIR administrative genders")
        for gender, code in self.gender_codes.items():
            if not math.isfinite(code):  # the model would get NaN or infinity as the feature
                raise ValueError(
                    f"gender_codes[{gender!r}] = {code!r}: give the finite number the model "
                    "was trained with for that gender"
                )
        return self


class Mapping(Strict):
    model: str = Field(min_length=1)
    services: Capped[Service] = Field(min_length=1)
    max_age_days: float = Field(default=365.0, gt=0.0, allow_inf_nan=False)
    patient: PatientSource = PatientSource()
    observations: Capped[ObservationSource] = Field(default_factory=list)
    derived: Capped[Derived] = Field(default_factory=list)
    outcome: str | None = None  # classifiers: the label whose probability is reported
    concept: Concept  # the outcome (classifier) or the predicted quantity (regressor)
    unit: Code | None = None  # regressors: UCUM unit of the prediction (system, code, display)
    summary: str = Field(min_length=1, max_length=60)  # the card's summary starts with it
    assumptions: Capped[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> Mapping:
        # Sets and a Counter: 32,000 derived entries took 7 s with list look-ups, on the loop.
        known = {n for n in (self.patient.age, self.patient.gender) if n}
        known |= {o.name for o in self.observations}
        for d in self.derived:
            missing = [a for a in d.args if a not in known]
            if missing:
                raise ValueError(f"derived '{d.name}' uses undefined quantities {missing}")
            known.add(d.name)
        dupes = sorted(n for n, k in Counter(self.quantities()).items() if k > 1)
        if dupes:
            raise ValueError(f"quantities defined more than once: {dupes}")
        twice = sorted(i for i, k in Counter(s.id for s in self.services).items() if k > 1)
        if twice:
            raise ValueError(f"CDS service ids listed more than once: {twice}")
        sources = {o.name: o for o in self.observations}
        for o in self.observations:
            if o.otherwise is None:
                continue
            for a in o.otherwise.args:
                if a not in sources or sources[a].otherwise is not None:
                    raise ValueError(
                        f"observation '{o.name}': fallback argument '{a}' must be an observation "
                        "source without a fallback of its own"
                    )
            try:
                self.fallback_factors(o, sources)
            except ucum.UnitError as exc:
                raise ValueError(f"observation '{o.name}': {exc}") from None
        if PATIENT_KEY in {o.key for o in self.observations}:
            raise ValueError(f"prefetch key '{PATIENT_KEY}' is reserved for the Patient")
        return self

    def fallback_factors(
        self, o: ObservationSource, sources: dict[str, ObservationSource] | None = None
    ) -> tuple[float, float]:
        """Factors of the fallback's two arguments: value = op(a x f_a, b x f_b) in o.unit."""
        assert o.otherwise is not None
        by_name = sources if sources is not None else {s.name: s for s in self.observations}
        a, b = (by_name[n] for n in o.otherwise.args)
        if o.otherwise.op == "mean_arterial":
            return ucum.factor(a.unit, o.unit), ucum.factor(b.unit, o.unit)
        # bmi: weight / height^2, in o.unit once a and b are in its base units.
        target = ucum.parse(o.unit)
        got = ucum.parse(a.unit).times(ucum.parse(b.unit), -2)
        if got.dims != target.dims:
            raise ucum.UnitError(f"{a.unit!r} / ({b.unit!r})^2 cannot be converted to {o.unit!r}")
        return got.factor / target.factor, 1.0

    def quantities(self) -> list[str]:
        names = [n for n in (self.patient.age, self.patient.gender) if n]
        return names + [o.name for o in self.observations] + [d.name for d in self.derived]

    def problems(self, manifest: Manifest) -> list[str]:
        """Why this mapping cannot feed `manifest`'s model (empty when it can): `fit.py`."""
        return fit.problems(self, manifest)

    def prefetch(self) -> dict[str, str]:
        """Discovery prefetch templates: the Patient, and per key the latest Observations."""
        out: dict[str, str] = {}
        if self.patient.age or self.patient.gender:
            out[PATIENT_KEY] = "Patient/{{context.patientId}}"
        groups: dict[str, list[ObservationSource]] = {}
        for o in self.observations:
            groups.setdefault(o.key, []).append(o)
        for key, sources in groups.items():
            every = [f"{c.system}|{c.code}" for s in sources for c in [*s.codes, *s.panels]]
            codes = ",".join(dict.fromkeys(every))  # each once, in order
            # Sorted newest first, as many as there are concepts under the key (the latest of each
            # when they were measured together, a panel; the latest of one otherwise) and two to
            # spare: a newest result without a value (a dataAbsentReason) was all an EHR sent,
            # and the older one a prediction could use was never seen (latest.py). Final
            # results only: unfiltered, a newer preliminary result would be the one sent.
            out[key] = (
                f"Observation?patient={{{{context.patientId}}}}&code={codes}"
                f"&status={','.join(STATUSES)}&_sort=-date&_count={len(sources) + SPARE}"
            )
        return out


class MappingError(ValueError):
    pass


def parse(raw: bytes | str | dict[str, object], where: str) -> Mapping:
    try:
        if isinstance(raw, dict):
            return Mapping.model_validate(raw)
        return Mapping.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MappingError(f"{where}: invalid clinical mapping: {exc}") from exc


def load_dir(root: Path) -> tuple[dict[str, Mapping], list[str]]:
    """Every `*.json` mapping under `root` by model name, and the problems of those refused."""
    found: dict[str, Mapping] = {}
    problems: list[str] = []
    if not root.is_dir():
        return found, problems
    for path in sorted(root.glob("*.json")):
        try:
            m = parse(path.read_bytes(), str(path))
        except (MappingError, OSError) as exc:
            problems.append(str(exc))
            continue
        if m.model in found:
            problems.append(f"{path}: a second mapping for model '{m.model}' (ignored)")
            continue
        found[m.model] = m
    return found, problems
