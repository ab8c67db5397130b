"""Cards and FHIR resources over many cases: never an empty value, always valid FHIR."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir_ehr import MODELS, breast_prefetch, breast_rows, diabetes_prefetch

from service.bundle.load import TrustPolicy, load_bundle
from service.clinical import cards, fhir, validation
from service.clinical.extracted import Extraction
from service.clinical.extraction import extract
from service.clinical.mapping import Mapping, load_dir
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.registry import discover, version_key

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MAPPINGS, _ = load_dir(MODELS / "clinical")


def newest(name: str) -> Path:
    found = [(v, p) for n, v, p in discover(MODELS) if n == name]
    return max(found, key=lambda vp: version_key(vp[0] or "0"))[1]


def served(name: str, refer: bool) -> ServedModel:
    overrides = {name: {"epistemic": 0.0}} if refer else None  # any uncertainty refers
    return ServedModel(load_bundle(newest(name), TrustPolicy()), referral_overrides=overrides)


@pytest.fixture(scope="module")
def inputs() -> dict[str, Extraction]:
    malignant, _ = breast_rows()
    return {
        "diabetes": extract(MAPPINGS["diabetes"], "p1", diabetes_prefetch(NOW), NOW),
        "breast-cancer": extract(
            MAPPINGS["breast-cancer"], "p1", breast_prefetch(malignant, NOW), NOW
        ),
    }


def all_empties(value: Any) -> list[str]:
    """An independent recursive check: null, "", [] or {} anywhere."""
    if value is None or value == "" or value == [] or value == {}:
        return ["here"]
    if isinstance(value, dict):
        return [f"{k}/{p}" for k, v in value.items() for p in all_empties(v)]
    if isinstance(value, list):
        return [f"{i}/{p}" for i, v in enumerate(value) for p in all_empties(v)]
    return []


CASES = [
    # model, referred, FHIR version, samples, interval method, encounter
    ("diabetes", False, "R4B", 100, "gaussian", None),
    ("diabetes", True, "R5", 100, "gaussian", "Encounter/e1"),
    ("diabetes", False, "R5", 200, "quantile", "Encounter/e1"),
    ("breast-cancer", False, "R4B", 100, "gaussian", "Encounter/e1"),
    ("breast-cancer", True, "R5", 100, "gaussian", None),
    ("breast-cancer", False, "R4B", 10, "gaussian", None),  # too few passes for an interval
    ("diabetes", True, "R4B", 100, "conformal", None),  # when the bundled model is calibrated
]


@pytest.mark.parametrize(("name", "refer", "version", "samples", "interval", "encounter"), CASES)
def test_cards_are_compact_and_carry_valid_fhir(
    name: str,
    refer: bool,
    version: validation.FhirVersion,
    samples: int,
    interval: Any,
    encounter: str | None,
    inputs: dict[str, Extraction],
) -> None:
    model, mapping, ex = served(name, refer), MAPPINGS[name], inputs[name]
    # The bundled default versions are calibrated: a conformal case must really be exercised.
    assert interval != "conformal" or model.calibrator.calibrated, f"{name} is not calibrated"
    x = np.asarray([ex.features(model.manifest.inputs.feature_names or [])], dtype=np.float32)
    pred = model.predict(x, PredictParams(samples, (0.95,), seed=7, interval=interval))
    ctx = fhir.Context(ex.patient, NOW, ex.basis(), encounter, version, mapping)
    res = fhir.resource(model, pred, 0, ctx)  # validates (fhir.resources + invariants)
    issued = cards.card(mapping, model, pred, 0, ex, res)
    card = issued.card
    assert all_empties(card) == [] and validation.empties(card) == []
    assert len(card["summary"]) < 140
    assert issued.referred == refer
    assert card["indicator"] == ("warning" if refer else "info")
    assert res["status"] == ("preliminary" if refer else "final")
    assert ("note" in res) == refer
    if refer:
        assert "Referred for clinician review" in card["detail"]
        assert "flagged for review" in card["summary"]
    assert card["suggestions"][0]["actions"][0]["resource"] is res
    assert model.digest in card["detail"] and f"seed {pred.seed}" in card["detail"]
    assert ("encounter" in res) == (encounter is not None)
    if name == "breast-cancer":
        (p,) = res["prediction"]
        assert ("probabilityRange" in p) != ("probabilityDecimal" in p)
        assert ("probabilityRange" in p) == (samples >= 40)
        labels = model.manifest.outputs.labels or []
        p_malignant = float(pred.summary.probabilities[0, labels.index("malignant")])  # type: ignore[union-attr]
        if "probabilityDecimal" in p:
            assert p["probabilityDecimal"] == pytest.approx(p_malignant * 100, abs=0.01)
        else:
            rng = p["probabilityRange"]
            assert rng["low"]["value"] <= p_malignant * 100 + 0.01
    else:
        types = [e["url"].rsplit("-", 1)[-1] for e in res["valueQuantity"]["extension"]]
        # The uncertainty type N (normal) only where the interval assumes one.
        assert types == (
            ["uncertainty", "uncertaintyType"] if interval == "gaussian" else ["uncertainty"]
        )
    device = res["contained"][0]
    assert ("name" if version == "R5" else "deviceName") in device


def test_invariants_catch_what_fhir_resources_does_not() -> None:
    percent = {"system": "http://unitsofmeasure.org", "code": "%"}
    good: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "contained": [{"resourceType": "Device", "id": "model"}],
        "performer": {"reference": "#model"},
        "prediction": [{"outcome": {"text": "x"}, "probabilityDecimal": 42.0}],
    }
    assert validation.invariants(good) == []
    validation.validate(good, "R4B")

    def broken(change: Any) -> list[str]:
        res = copy.deepcopy(good)
        change(res)
        return validation.invariants(res)

    assert any(
        "ras-2" in p for p in broken(lambda r: r["prediction"][0].update(probabilityDecimal=140))
    )
    in_ratio = {"low": {"value": 0.2, "unit": "1"}, "high": {"value": 0.4}}
    assert any(
        "ras-1" in p
        for p in broken(
            lambda r: (
                r["prediction"][0].pop("probabilityDecimal")
                and r["prediction"][0].update(probabilityRange=in_ratio)
            )
        )
    )
    upside_down = {"low": {"value": 60, **percent}, "high": {"value": 40, **percent}}
    assert any(
        "low above high" in p
        for p in broken(
            lambda r: (
                r["prediction"][0].pop("probabilityDecimal")
                and r["prediction"][0].update(probabilityRange=upside_down)
            )
        )
    )
    both = {"low": {"value": 40, **percent}, "high": {"value": 60, **percent}}
    assert any(
        "together" in p for p in broken(lambda r: r["prediction"][0].update(probabilityRange=both))
    )
    assert any("dom-3" in p for p in broken(lambda r: r.pop("performer")))
    assert any("empty" in p for p in broken(lambda r: r.update(note=[])))
    assert any("status" in p for p in broken(lambda r: r.update(status="done")))
    with pytest.raises(ValueError, match="invalid FHIR"):
        validation.validate({**good, "unknownField": 1}, "R4B")


def test_operation_outcome_validates() -> None:
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    OperationOutcome.model_validate(fhir.operation_outcome("required", "HDL is missing"))


def test_summary_is_cut_below_140(inputs: dict[str, Extraction]) -> None:
    model = served("diabetes", refer=True)
    long = Mapping.model_validate(MAPPINGS["diabetes"].model_dump() | {"summary": "x" * 60})
    ex = inputs["diabetes"]
    x = np.asarray([ex.features(model.manifest.inputs.feature_names or [])], dtype=np.float32)
    pred = model.predict(x, PredictParams(100, (0.95,), seed=1))
    pred.summary = type(pred.summary)(  # type: ignore[misc]
        **{**vars(pred.summary), "mean": np.full((1, 1), 1.23456e12)}  # absurd, long numbers
    )
    text = cards.summary(long, model, pred, 0)
    assert len(text) < 140
