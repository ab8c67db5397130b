"""Clinical mappings and reading a prefetch: ages, latest results, units, derived features."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fhir_ehr import (
    LOINC,
    MODELS,
    diabetes_prefetch,
    observation,
    patient,
    searchset,
)

from service.bundle.load import TrustPolicy, load_bundle
from service.clinical.catalogue import Catalogue
from service.clinical.extraction import extract
from service.clinical.mapping import MappingError, load_dir, parse
from service.clinical.orders import wanted
from service.clinical.records import birth_date, parse_time, whole_years
from service.errors import InvalidInputError, MissingDataError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MAPPINGS, PROBLEMS = load_dir(MODELS / "clinical")
DIABETES = MAPPINGS["diabetes"]


def issues(exc: pytest.ExceptionInfo[MissingDataError]) -> dict[str, dict[str, Any]]:
    return {i["details"]["text"]: i for i in exc.value.details}


def test_shipped_mappings_fit_the_bundled_models() -> None:
    assert PROBLEMS == [] and set(MAPPINGS) == {"diabetes", "breast-cancer"}
    catalogue = Catalogue(MAPPINGS)
    for name, mapping in MAPPINGS.items():
        for path in sorted((MODELS / name).iterdir()):
            model = load_bundle(path, TrustPolicy())
            assert mapping.problems(model.manifest) == [], (name, path)
        assert catalogue.mappings[name] is mapping


def test_features_in_model_order() -> None:
    ex = extract(DIABETES, "p1", diabetes_prefetch(NOW), NOW)
    names = ["age", "sex", "bmi", "bp", "tc", "ldl", "hdl", "tch", "ltg", "glu"]
    got = dict(zip(names, ex.features(names), strict=True))
    assert got["age"] == 60  # born 1965-03-01, on 2025-06-01
    assert got["sex"] == 2  # female, ISO/IEC 5218
    assert got["tch"] == pytest.approx(157 / 38)
    assert got["ltg"] == pytest.approx(math.log(129))
    assert ex.basis()[0] == "Patient/p1" and "Observation/tg-1" in ex.basis()
    assert ex.used["ltg"].formula == "ln(tg)" and ex.used["ltg"].source is None


def test_age_in_whole_years() -> None:
    assert whole_years(date(1965, 6, 1), date(2025, 6, 1)) == 60
    assert whole_years(date(1965, 6, 2), date(2025, 6, 1)) == 59
    assert birth_date("1965") == date(1965, 7, 1)
    assert birth_date("1965-03") == date(1965, 3, 15)
    assert birth_date("1965-03-04") == date(1965, 3, 4)
    assert birth_date("not a date") is None
    prefetch = diabetes_prefetch(NOW)
    prefetch["patient"] = patient(birth="2030-01-01")
    with pytest.raises(MissingDataError) as exc:
        extract(DIABETES, "p1", prefetch, NOW)
    assert "Patient.birthDate" in issues(exc)


def test_gender_other_cannot_be_mapped() -> None:
    prefetch = diabetes_prefetch(NOW)
    prefetch["patient"] = patient(gender="other")
    with pytest.raises(MissingDataError) as exc:
        extract(DIABETES, "p1", prefetch, NOW)
    assert "'other' cannot be mapped" in issues(exc)["Patient.gender"]["diagnostics"]


def test_fhir_times() -> None:
    assert parse_time("2024") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_time("2024-05") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_time("2024-05-06") == datetime(2024, 5, 6, tzinfo=UTC)
    assert parse_time("2024-05-06T10:00:00+02:00") == datetime(2024, 5, 6, 8, tzinfo=UTC)
    assert parse_time("2024-05-06T10:00:00Z") == datetime(2024, 5, 6, 10, tzinfo=UTC)
    assert parse_time("yesterday") is None


def test_latest_final_result_wins() -> None:
    prefetch = diabetes_prefetch(NOW)
    prefetch["hdl"] = searchset(
        observation("hdl-old", LOINC, "2085-9", 50.0, "mg/dL", NOW - timedelta(days=100)),
        observation("hdl-new", LOINC, "2085-9", 40.0, "mg/dL", NOW - timedelta(days=5)),
        observation(
            "hdl-prelim",
            LOINC,
            "2085-9",
            99.0,
            "mg/dL",
            NOW - timedelta(days=1),
            status="preliminary",
        ),
        observation("hdl-wrong", LOINC, "2085-9", 77.0, "mg/dL", NOW, status="entered-in-error"),
    )
    ex = extract(DIABETES, "p1", prefetch, NOW)
    assert ex.used["hdl"].value == 40.0 and ex.used["hdl"].source == "Observation/hdl-new"


def test_a_component_of_a_panel_counts() -> None:
    prefetch = diabetes_prefetch(NOW)
    panel = observation("bp-panel", LOINC, "85354-9", None, None, NOW - timedelta(days=2))
    del panel["valueQuantity"]
    panel["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": "8478-0"}]},
            "valueQuantity": {
                "value": 95,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }
    ]
    prefetch["bp"] = searchset(panel)
    ex = extract(DIABETES, "p1", prefetch, NOW)
    assert ex.used["bp"].value == 95 and ex.used["bp"].source == "Observation/bp-panel"


def test_units() -> None:
    si = diabetes_prefetch(NOW, tg=(1.456, "mmol/L", "14927-8"), glu=(4.83, "mmol/L", "14749-6"))
    ex = extract(DIABETES, "p1", si, NOW)
    assert ex.used["tg"].value == pytest.approx(1.456 * 88.57)
    assert ex.used["tg"].given == "1.456 mmol/L"
    assert ex.used["glu"].value == pytest.approx(4.83 * 18.016)
    # Units as EHRs write them are converted by UCUM, not matched as strings (issue 24).
    for given in [(129.0, "mg/dl"), (1.29, "g/L"), (129.0, "mg/(100.mL)"), (1290.0, "mg/L")]:
        ex = extract(DIABETES, "p1", diabetes_prefetch(NOW, tg=given), NOW)
        assert ex.used["tg"].value == pytest.approx(129.0), given
    # BMI in pounds per square inch: 0.0456 x 0.45359237 kg / 0.0254**2 m2 = 32.06 kg/m2.
    ex = extract(DIABETES, "p1", diabetes_prefetch(NOW, bmi=(0.0456, "[lb_av]/[in_i]2")), NOW)
    assert ex.used["bmi"].value == pytest.approx(0.0456 * 703.0695796)
    # 13.5 kPa = 13.5 / 0.133322 mm[Hg] = 101.26 mm[Hg].
    ex = extract(DIABETES, "p1", diabetes_prefetch(NOW, bp=(13.5, "kPa")), NOW)
    assert ex.used["bp"].value == pytest.approx(13.5 / 0.133322)
    # A unit that contradicts the code (mmol/L under the mass-concentration code, and the
    # reverse) is refused: one of the two is wrong, and converting would hide which.
    for slip in [(1.456, "mmol/L", "2571-8"), (129.0, "mg/dL", "14927-8")]:
        with pytest.raises(MissingDataError) as exc:
            extract(DIABETES, "p1", diabetes_prefetch(NOW, tg=slip), NOW)
        assert "the code or the unit is wrong" in issues(exc)["Triglycerides"]["diagnostics"]
    for bad in [(129.0, "mg"), (129.0, None), (129.0, "Cel"), (129.0, "10*9/L"), (1.0, "mg/dX")]:
        with pytest.raises(MissingDataError) as exc:
            extract(DIABETES, "p1", diabetes_prefetch(NOW, tg=bad), NOW)
        issue = issues(exc)["Triglycerides"]
        assert issue["code"] == "code-invalid", bad
        assert "must convert to mg/dL" in issue["diagnostics"]
    prefetch = diabetes_prefetch(NOW)
    q = prefetch["tg"]["entry"][0]["resource"]["valueQuantity"]
    q["system"] = "http://example.org/units"
    with pytest.raises(MissingDataError, match="Triglycerides"):
        extract(DIABETES, "p1", prefetch, NOW)
    q.update(system="http://unitsofmeasure.org", comparator="<")
    with pytest.raises(MissingDataError) as exc:
        extract(DIABETES, "p1", prefetch, NOW)
    assert "a bound" in issues(exc)["Triglycerides"]["diagnostics"]


def test_too_old_and_the_age_setting() -> None:
    prefetch = diabetes_prefetch(NOW)
    later = NOW + timedelta(days=354)  # results are 10 days old at NOW: 364 days old then
    extract(DIABETES, "p1", prefetch, later)
    with pytest.raises(MissingDataError) as exc:
        extract(DIABETES, "p1", prefetch, later + timedelta(days=2))
    assert {i["code"] for i in exc.value.details} == {"business-rule"}
    with pytest.raises(MissingDataError):
        extract(DIABETES, "p1", prefetch, NOW, max_age_days=5)  # the setting overrides


def test_values_a_derivation_cannot_use() -> None:
    with pytest.raises(MissingDataError) as exc:
        extract(DIABETES, "p1", diabetes_prefetch(NOW, tg=(0.0, "mg/dL"), hdl=(0.0, "mg/dL")), NOW)
    assert set(issues(exc)) == {"ln(triglycerides)", "Total cholesterol / HDL"}


def test_prefetch_shapes() -> None:
    prefetch: dict[str, Any] = diabetes_prefetch(NOW)
    prefetch["glu"] = {"resourceType": "OperationOutcome", "issue": []}  # the client failed
    with pytest.raises(MissingDataError, match="Glucose"):
        extract(DIABETES, "p1", prefetch, NOW)
    prefetch["glu"] = ["not", "a", "resource"]
    with pytest.raises(InvalidInputError, match=r"prefetch\.glu"):
        extract(DIABETES, "p1", prefetch, NOW)
    prefetch = diabetes_prefetch(NOW)
    prefetch["hdl"]["entry"][0]["resource"]["subject"] = {"reference": "Patient/p2"}
    with pytest.raises(InvalidInputError, match="another patient"):
        extract(DIABETES, "p1", prefetch, NOW)
    with pytest.raises(MissingDataError):
        extract(DIABETES, "p1", None, NOW)


def test_mapping_validation() -> None:
    raw = DIABETES.model_dump(mode="json")
    with pytest.raises(MappingError, match="undefined"):
        parse(
            raw
            | {"derived": [{"name": "x", "title": "x", "op": "ln", "args": ["nope"], "unit": "1"}]},
            "test",
        )
    with pytest.raises(MappingError, match="more than once"):
        parse(raw | {"observations": raw["observations"] * 2}, "test")
    with pytest.raises(MappingError, match="takes 2"):
        parse(
            raw
            | {
                "derived": [{"name": "x", "title": "x", "op": "ratio", "args": ["tc"], "unit": "1"}]
            },
            "test",
        )
    with pytest.raises(MappingError, match="administrative"):
        parse(raw | {"patient": {**raw["patient"], "gender_codes": {"m": 1}}}, "test")
    obs = raw["observations"]
    wrong_unit = [obs[0] | {"unit": "kg/m^2"}, *obs[1:]]
    with pytest.raises(MappingError, match="not a UCUM unit"):
        parse(raw | {"observations": wrong_unit}, "test")
    dimensionless = [obs[0] | {"unit": "{a.u.}"}, *obs[1:]]
    with pytest.raises(MappingError, match="dimensionless"):
        parse(raw | {"observations": dimensionless}, "test")
    by_name = {o["name"]: o for o in obs}
    nope = {"otherwise": {"op": "bmi", "args": ["weight", "nope"]}}
    unknown_arg = [o | nope if o["name"] == "bmi" else o for o in obs]
    with pytest.raises(MappingError, match="fallback argument 'nope'"):
        parse(raw | {"observations": unknown_arg}, "test")
    wrong_kind = [o | {"unit": "mg"} if o["name"] == "height" else o for o in obs]
    assert by_name["bmi"]["otherwise"]["args"] == ["weight", "height"]
    with pytest.raises(MappingError, match=r"cannot be converted to 'kg/m2'"):
        parse(raw | {"observations": wrong_kind}, "test")
    with pytest.raises(MappingError, match="used by"):
        Catalogue({"a": parse(raw, "a"), "b": parse(raw | {"model": "b"}, "b")})


def test_order_filter() -> None:
    service = DIABETES.services[1]
    med: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.whocc.no/atc", "code": "A10AB01"}]
        },
    }
    assert wanted(service, [med])
    r5 = {
        "resourceType": "MedicationRequest",
        "medication": {"concept": med.pop("medicationCodeableConcept")},
    }
    assert wanted(service, [r5])
    assert not wanted(
        service,
        [
            {
                "resourceType": "ServiceRequest",
                "code": {"coding": [{"system": "http://www.whocc.no/atc", "code": "A10AB01"}]},
            }
        ],
    )
    assert not wanted(service, [])
    # RxNorm, a flat system: listed concepts (issue 24: metformin 500 MG Oral Tablet).
    rxnorm = "http://www.nlm.nih.gov/research/umls/rxnorm"
    for code, want in (("861007", True), ("6809", True), ("86100", False), ("8610070", False)):
        order = {
            "resourceType": "MedicationRequest",
            "medicationCodeableConcept": {"coding": [{"system": rxnorm, "code": code}]},
        }
        assert wanted(service, [order]) is want, code
    assert wanted(DIABETES.services[0], [])  # no filter: every call


def test_clinical_modules_do_not_import_fastapi() -> None:
    import subprocess
    import sys

    code = (
        "import sys, service.clinical.cards, service.clinical.catalogue, "
        "service.clinical.extraction, service.clinical.fhir, service.clinical.hooks, "
        "service.clinical.ledger, service.clinical.mapping, service.clinical.trust, "
        "service.clinical.validation; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
