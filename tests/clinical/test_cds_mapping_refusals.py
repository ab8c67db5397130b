"""Mappings that loaded fine and then answered every call wrongly, or with a 500: each is now
refused when it is read (or where it meets its model), naming the field and what to write."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cds_client import Signer, auth
from fhir_ehr import LOINC, MODELS, diabetes_prefetch, hook_call, observation, searchset

from service.bundle.manifest import parse_manifest
from service.clinical.catalogue import Catalogue
from service.clinical.extracted import Extraction
from service.clinical.extraction import extract
from service.clinical.mapping import MappingError, load_dir, parse
from service.clinical.terms import MAX_ENTRIES
from service.errors import MissingDataError, ModelNotFoundError, ModelNotReadyError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MAPPINGS = load_dir(MODELS / "clinical")[0]
RAW = MAPPINGS["diabetes"].model_dump(mode="json", exclude_none=True)
BREAST = MAPPINGS["breast-cancer"].model_dump(mode="json", exclude_none=True)
MANIFEST = parse_manifest((MODELS / "diabetes" / "2" / "manifest.json").read_bytes(), "diabetes")
DIABETES = "/cds-services/diabetes-progression"


def with_observation(name: str, **change: Any) -> dict[str, Any]:
    """The diabetes mapping with observation `name` changed (None removes a field)."""
    obs = [
        {k: v for k, v in (o | change).items() if v is not None} if o["name"] == name else o
        for o in RAW["observations"]
    ]
    return RAW | {"observations": obs}


def refused(raw: dict[str, Any], *words: str) -> str:
    with pytest.raises(MappingError) as caught:
        parse(raw, "test")
    said = str(caught.value)
    assert all(w in said for w in words), said
    return said


# 3. An optional feature (or a derivation from an optional source): a KeyError on every call.


def test_an_optional_feature_is_refused_where_the_mapping_meets_its_model() -> None:
    mapping = parse(with_observation("glu", optional=True), "test")
    assert mapping.problems(MANIFEST) == [
        "feature 'glu' is an optional observation: a missing one raises no issue, so the model "
        "would get no value; remove `optional` from 'glu' (it is for the arguments of a "
        "fallback)"
    ]
    derived = parse(with_observation("tg", optional=True), "test")  # ltg = ln(tg)
    (problem,) = derived.problems(MANIFEST)
    assert "feature 'ltg' is derived from the optional observation(s) ['tg']" in problem


def test_a_feature_without_a_value_is_missing_data_not_a_key_error() -> None:
    ex = Extraction(patient="Patient/p1")
    with pytest.raises(MissingDataError) as caught:
        ex.features(["glu"])
    assert caught.value.details[0]["details"] == {"text": "glu"}
    assert caught.value.details[0]["code"] == "required"


# 4. A BMI from a height that squares to 0.0: ZeroDivisionError, a 500.


def bmi_from(weight: float, height: float, now: datetime) -> dict[str, Any]:
    prefetch = diabetes_prefetch(now, bmi=None)
    when = now - timedelta(days=3)
    prefetch["body"] = searchset(
        observation("w", LOINC, "29463-7", weight, "kg", when),
        observation("h", LOINC, "8302-2", height, "m", when),
    )
    return prefetch


@pytest.mark.parametrize(("weight", "height"), [(70.0, 1e-170), (1e-300, 1e160)])
def test_a_bmi_that_cannot_be_derived_is_said(weight: float, height: float) -> None:
    with pytest.raises(MissingDataError) as caught:
        extract(MAPPINGS["diabetes"], "p1", bmi_from(weight, height, NOW), NOW)
    (issue,) = caught.value.details
    assert "nor could it be derived (weight / height^2) from these values" in issue["diagnostics"]


async def test_a_bmi_that_cannot_be_derived_is_an_info_card(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    body = hook_call(bmi_from(70.0, 1e-170, datetime.now(UTC)))
    r = await ehr.post(DIABETES, json=body, headers=auth(es384, DIABETES))
    assert r.status_code == 200, r.text
    assert "nor could it be derived" in r.json()["cards"][0]["detail"]


# 5. Strings FHIR forbids: a 500 when fhir.resources validated the answer.


@pytest.mark.parametrize(
    ("coding", "words"),
    [
        ({"system": "https://x.example/cs", "code": "a", "display": ""}, ["display", "blank"]),
        ({"system": "https://x.example/cs", "code": "a", "display": "  "}, ["display", "blank"]),
        ({"system": "https://x.example/cs", "code": " a"}, ["code ' a' is not a FHIR code"]),
        ({"system": "https://x.example/cs", "code": "a  b"}, ["code 'a  b' is not a FHIR code"]),
        ({"system": "   ", "code": "a"}, ["system", "not a FHIR uri"]),
        ({"system": "https://x.example/a b", "code": "a"}, ["system", "not a FHIR uri"]),
    ],
)
def test_codes_fhir_forbids_are_refused_at_load(coding: dict[str, Any], words: list[str]) -> None:
    refused(RAW | {"concept": {"text": "x", "coding": [coding]}}, "concept.coding.0", *words)
    unit = {"system": "http://unitsofmeasure.org", "code": "{score}"} | coding
    refused(RAW | {"unit": unit}, "unit.", *words)


def test_a_blank_concept_text_is_refused() -> None:
    refused(RAW | {"concept": {"text": " "}}, "concept.text", "text is blank")


# 6. Unit factors, gender codes and molar masses that are not finite numbers > 0, or that
# contradict UCUM or the model's own units.


@pytest.mark.parametrize("factor", [0.0, -18.0, float("nan"), float("inf")])
def test_a_unit_factor_must_be_finite_and_positive(factor: float) -> None:
    refused(
        with_observation("glu", units={"mg/dL": 1.0, "[IU]": factor}),
        "observation 'glu': units['[IU]']",
        "a unit's factor must be a finite number > 0",
    )


def test_a_unit_factor_ucum_disagrees_with_is_refused() -> None:
    refused(
        with_observation("ldl", units={"mg/dL": 0.5}),
        "units['mg/dL'] = 0.5, but UCUM converts mg/dL to mg/dL with the factor 1",
    )
    # Glucose: 180.16 g/mol makes 1 mmol/L 18.016 mg/dL; 18 is a rounding UCUM would not do.
    refused(
        with_observation("glu", units={"mmol/L": 18.0}),
        "units['mmol/L'] = 18.0, but UCUM converts mmol/L to mg/dL with the factor 18.016",
    )
    parse(with_observation("glu", units={"mmol/L": 18.016, "[IU]": 3.0}), "test")  # agreed


@pytest.mark.parametrize("code", [float("nan"), float("inf"), float("-inf")])
def test_gender_codes_must_be_finite(code: float) -> None:
    patient = RAW["patient"] | {"gender_codes": {"male": 1, "female": code}}
    refused(RAW | {"patient": patient}, "gender_codes['female']", "finite number")


@pytest.mark.parametrize("mass", [0.0, -1.0, float("inf"), float("nan")])
def test_a_molar_mass_must_be_finite_and_positive(mass: float) -> None:
    refused(with_observation("glu", molar_mass=mass), "molar_mass")


def test_the_mapping_s_unit_must_be_the_model_s() -> None:
    mapping = parse(with_observation("ldl", unit="mmol/L", molar_mass=386.7), "test")
    assert mapping.problems(MANIFEST) == [
        "feature 'ldl': the mapping's unit 'mmol/L' and the model's input unit 'mg/dL' "
        "(manifest inputs.units) do not convert into each other; give the mapping the model's "
        "unit 'mg/dL' (results in other units are converted to it)"
    ]
    grams = parse(with_observation("ldl", unit="g/L"), "test")
    (problem,) = grams.problems(MANIFEST)
    assert "'g/L' and the model's input unit 'mg/dL' (manifest inputs.units) differ" in problem


# 7. Bounded lists, checked before their entries are.


@pytest.mark.parametrize("field", ["observations", "derived", "assumptions", "services"])
def test_a_mapping_s_lists_are_bounded(field: str) -> None:
    over = [RAW[field][0]] * (MAX_ENTRIES + 1) if RAW[field] else ["x"] * (MAX_ENTRIES + 1)
    refused(RAW | {field: over}, field, f"{MAX_ENTRIES + 1} entries, over the limit of 1000")


def test_codes_and_panels_are_bounded() -> None:
    code = {"system": LOINC, "code": "2345-7"}
    for field in ("codes", "panels"):
        refused(with_observation("glu", **{field: [code] * 1001}), f"{field}", "over the limit")


def test_a_thousand_derived_quantities_load_at_once() -> None:
    many = [
        {"name": f"d{i}", "title": "t", "op": "ln", "args": ["tg"], "unit": "u"}
        for i in range(MAX_ENTRIES - len(RAW["derived"]))
    ]
    t = time.perf_counter()
    parse(RAW | {"derived": RAW["derived"] + many}, "test")
    assert time.perf_counter() - t < 5.0  # 32,000 took 7 s with quadratic checks


# 9. Codes and systems go into discovery's prefetch query: nothing that changes the query.


@pytest.mark.parametrize(
    ("code", "shown"),
    [
        ("2345-7&patient=OTHER&_count=500", "'&'"),
        ("2345-7,2339-0", "','"),
        ("a|b", "'|'"),
        ("a b", "' '"),
        ("a#b", "'#'"),
        ("a%26b", "'%'"),
    ],
)
def test_a_code_that_would_change_the_prefetch_query_is_refused(code: str, shown: str) -> None:
    refused(
        with_observation("glu", codes=[{"system": LOINC, "code": code}]),
        "observation 'glu': codes[0].code",
        shown,
        "may hold printable ASCII only",
    )
    panel = {"system": "http://loinc.org?x=1", "code": "85354-9"}
    refused(with_observation("bp", panels=[panel]), "observation 'bp': panels[0].system", "'?'")


# 8. Service ids across bundle manifests: the mapping directory's ids stay their models'; another
# id two models name is offered by neither.


class Model:
    def __init__(self, name: str, clinical: dict[str, Any] | None) -> None:
        version = "2"
        raw = (MODELS / name / version / "manifest.json").read_bytes()
        self.manifest = parse_manifest(raw, name).model_copy(update={"clinical": clinical})
        self.name, self.version, self.digest = name, version, f"sha256:{name}:{id(clinical)}"


class Entry:
    def __init__(self, name: str, ready: bool = True) -> None:
        self.name, self.ready = name, ready


class Registry:
    def __init__(self, *models: Model, loading: tuple[str, ...] = ()) -> None:
        self.models = {m.name: m for m in models}
        self.loading = loading

    def entries(self) -> list[Entry]:
        return [Entry(n, n not in self.loading) for n in [*self.models, *self.loading]]

    def get(self, name: str) -> Model:
        if name in self.loading:
            raise ModelNotReadyError(f"model '{name}' is loading")
        return self.models[name]

    def versions(self, name: str) -> list[Entry]:
        return [Entry(name)] if name in self.models or name in self.loading else []


def _discover(catalogue: Catalogue, registry: Any) -> dict[str, str]:
    services = catalogue.discovery(registry)["services"]
    ids = [s["id"] for s in services]
    assert len(ids) == len(set(ids))
    return {s["id"]: s["extension"]["example.mcserve.model"]["model"] for s in services}


def test_a_bundle_cannot_take_another_model_s_service_id(caplog: pytest.LogCaptureFixture) -> None:
    thief = BREAST | {"services": [BREAST["services"][0] | {"id": "diabetes-progression"}]}
    catalogue = Catalogue(dict(MAPPINGS))
    registry: Any = Registry(Model("diabetes", None), Model("breast-cancer", thief))
    with caplog.at_level(logging.ERROR, logger="mcserve.cds"):
        for _ in range(2):
            owner = _discover(catalogue, registry)
    assert owner["diabetes-progression"] == "diabetes"  # the mapping directory's
    reasons = [r.reason for r in caplog.records if hasattr(r, "reason")]
    assert reasons == [
        "CDS service id 'diabetes-progression' belongs to model 'diabetes' (the mapping "
        "directory); the clinical mappings of 'breast-cancer' (version 2) name it too and are "
        "not offered it"
    ]  # logged once, not at every discovery
    # While diabetes loads, the bundle still does not get its id: the call waits for diabetes.
    loading: Any = Registry(Model("breast-cancer", thief), loading=("diabetes",))
    assert "diabetes-progression" not in _discover(catalogue, loading)
    with pytest.raises(ModelNotReadyError):
        catalogue.find("diabetes-progression", loading)


def test_an_id_two_bundles_name_is_offered_by_neither_until_one_gives_it_up() -> None:
    mine = BREAST | {"services": [BREAST["services"][0] | {"id": "shared"}]}
    diabetes = MAPPINGS["diabetes"].model_dump(mode="json", exclude_none=True)
    theirs = diabetes | {"services": [diabetes["services"][0] | {"id": "shared"}]}
    catalogue = Catalogue({})  # no mapping directory: both come from their manifests
    both: Any = Registry(Model("breast-cancer", mine), Model("diabetes", theirs))
    assert "shared" not in _discover(catalogue, both)
    with pytest.raises(ModelNotFoundError, match="named by the clinical mappings of several"):
        catalogue.find("shared", both)
    one: Any = Registry(Model("breast-cancer", mine), Model("diabetes", None))
    assert catalogue.find("shared", one).model.name == "breast-cancer"  # no stale clash
    gone: Any = Registry(Model("diabetes", None))
    with pytest.raises(ModelNotFoundError, match="no CDS service 'shared' is offered"):
        catalogue.find("shared", gone)


def test_a_service_id_listed_twice_in_one_mapping_is_refused() -> None:
    twice = BREAST | {"services": [BREAST["services"][0]] * 2}
    with pytest.raises(MappingError, match="CDS service ids listed more than once"):
        parse(twice, "m")
