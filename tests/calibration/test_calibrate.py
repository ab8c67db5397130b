"""`calibrate` writes a new immutable version and leaves the source byte-identical; `evaluate`
writes its report."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from calib_repo import CAL_SAMPLES, Repo, build
from typer.testing import CliRunner

from service.bundle import load_bundle
from service.calibration.data import read
from service.calibration.recalibration import next_version
from service.cli import app

runner = CliRunner()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and, by the keys, the listing itself)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return build(tmp_path_factory.mktemp("fresh") / "models")


def test_calibrate_writes_a_new_version_and_leaves_the_source_alone(fresh: Repo) -> None:
    src = fresh.root / "reg" / "1"
    before = tree_hashes(src)
    args = [
        "calibrate",
        str(src),
        "--data",
        str(fresh.data / "reg-calibration.csv"),
        "--out",
        str(fresh.root),
        "--samples",
        str(CAL_SAMPLES),
        "--seed",
        "3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {fresh.root / 'reg' / '2'} (version 2, from 1)" in result.output
    assert tree_hashes(src) == before
    new = load_bundle(fresh.root / "reg" / "2")  # verifies every artifact hash
    old = load_bundle(src)
    m = new.manifest
    assert m.version == "2" and m.defaults.interval == "conformal"
    assert {k: a.sha256 for k, a in m.artifacts.items()} == {
        k: a.sha256 for k, a in old.manifest.artifacts.items()
    }
    cal = m.calibration
    assert cal is not None
    assert (cal.n, cal.samples, cal.seed, cal.temperature) == (60, CAL_SAMPLES, 3, None)
    assert cal.scores == sorted(cal.scores) and len(cal.scores) == 60
    assert cal.source == {"version": "1", "digest": old.digest}
    rows = read(fresh.data / "reg-calibration.csv", m)
    assert cal.row_fingerprints == rows.fingerprints()
    assert cal.data["sha256"] == hashlib.sha256(rows.path.read_bytes()).hexdigest()
    # The same bytes again: a second run with another version name writes an identical manifest
    # apart from the version.
    again = runner.invoke(app, [*args, "--version", "2b"])
    assert again.exit_code == 0, again.output
    m2 = json.loads((fresh.root / "reg" / "2b" / "manifest.json").read_text())
    assert m2 | {"version": "2"} == json.loads(
        (fresh.root / "reg" / "2" / "manifest.json").read_text()
    )
    assert tree_hashes(src) == before
    # Versions are immutable: writing over 2 is refused, and the failed run leaves no trace.
    listing = sorted(p.name for p in fresh.root.iterdir())
    refused = runner.invoke(app, [*args, "--version", "2"])
    assert refused.exit_code == 2
    assert "already exists: bundle versions are immutable" in refused.output
    assert sorted(p.name for p in fresh.root.iterdir()) == listing  # no staging dir left


def test_classifier_calibration_has_temperature_and_set_referral(fresh: Repo) -> None:
    src = fresh.root / "clf" / "1"
    before = tree_hashes(src)
    result = runner.invoke(
        app,
        [
            "calibrate",
            str(src),
            "--data",
            str(fresh.data / "clf-calibration.csv"),
            "--out",
            str(fresh.root),
            "--samples",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output
    assert tree_hashes(src) == before
    m = load_bundle(fresh.root / "clf" / "2").manifest
    assert m.calibration is not None and m.calibration.temperature is not None
    assert m.calibration.score == "one-minus-probability"
    fit = m.calibration.temperature_fit
    assert fit["nll"] <= fit["nll_at_1"] + 1e-12 and fit["rule"] == "one-standard-error"
    # Set jointly: the set trigger may take half the 10 % the policy refers; an ambiguous set
    # was referred every time, but here ambiguity is common, so only an empty set refers.
    assert m.referral is not None and m.referral.max_set_size == 3
    assert m.defaults.interval == "gaussian"  # classifiers have no conformal interval


def test_next_version_and_errors(fresh: Repo, tmp_path: Path) -> None:
    assert next_version(tmp_path, "reg", "1") == "2"
    (tmp_path / "reg" / "7").mkdir(parents=True)
    (tmp_path / "reg" / "v9").mkdir()
    assert next_version(tmp_path, "reg", "3") == "8"
    assert next_version(tmp_path, "new", "beta") == "1"
    (tmp_path / "reg" / "\u00b2").mkdir()  # '²'.isdigit(), and int('²') failed
    assert next_version(tmp_path, "reg", "3") == "8"
    bad = tmp_path / "bad.csv"
    bad.write_text("x0,x1,target\n1,2,3\n")
    result = runner.invoke(
        app,
        ["calibrate", str(fresh.root / "reg" / "1"), "--data", str(bad), "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "missing ['x2']" in result.output
    for percentile in ("-5", "0", "100", "150"):  # -5 and 0 wrote a version referring all
        result = runner.invoke(
            app,
            ["calibrate", str(fresh.root / "reg" / "1"), "--data", str(bad), "--out",
             str(tmp_path / "p"), f"--percentile={percentile}"],
        )  # fmt: skip
        assert result.exit_code == 2 and "must lie between 0 and 100" in result.output
    assert not (tmp_path / "p").exists()


def test_overlap_with_training_rows_is_warned(fresh: Repo, tmp_path: Path) -> None:
    """Fingerprints of the bundle's train rows that also appear in the calibration data."""
    repo = tmp_path / "models"
    shutil.copytree(fresh.root / "reg" / "1", repo / "reg" / "1")
    manifest = repo / "reg" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    rows = read(fresh.data / "reg-calibration.csv", load_bundle(repo / "reg" / "1").manifest)
    data["training"]["row_fingerprints"] = {"train": rows.fingerprints()[:5]}
    manifest.write_text(json.dumps(data))
    result = runner.invoke(
        app,
        [
            "calibrate",
            str(repo / "reg" / "1"),
            "--data",
            str(fresh.data / "reg-calibration.csv"),
            "--out",
            str(repo),
            "--samples",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "5 of the 60 calibration rows are among the bundle's train rows" in result.output


def test_evaluate_writes_markdown_json_and_plots(calibrated: Repo, tmp_path: Path) -> None:
    for name, pngs in (
        ("reg", ["coverage.png"]),
        ("clf", ["reliability.png", "risk_coverage.png"]),
    ):
        out = tmp_path / name
        result = runner.invoke(
            app,
            [
                "evaluate",
                str(calibrated.root / name / "2"),
                "--data",
                str(calibrated.data / f"{name}-test.csv"),
                "--out",
                str(out),
                "--samples",
                "20",
            ],
        )
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "report.json", *pngs])
        for png in pngs:
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        numbers = json.loads((out / "report.json").read_text())
        text = (out / "report.md").read_text()
        assert numbers["model"]["version"] == "2" and numbers["data"]["rows"] == 40
        assert "referral" in numbers and "## Referral" in text
        # Each trigger's share of the rows, to set against the policy's nominal rate.
        ref = numbers["referral"]
        assert ref["trigger_rates"] == {k: v / 40 for k, v in ref["triggers"].items()}
        for k, v in ref["triggers"].items():
            assert f"{k} {v} ({100 * v / 40:.1f} %)" in text
        if name == "reg":  # the finite-sample expectation is said of conformal intervals only
            assert all("expected_coverage" in r for r in numbers["intervals"]["conformal"])
            assert not any("expected_coverage" in r for r in numbers["intervals"]["gaussian"])
            assert [r["level"] for r in numbers["intervals"]["conformal"]] == [
                0.5,
                0.8,
                0.9,
                0.95,
                0.99,
            ]
            assert f"{numbers['rmse']:.4f}" in text
        else:
            assert f"{numbers['served']['ece']:.4f}" in text
            assert 0 <= numbers["served"]["ece"] <= 1
    # Evaluating on the calibration rows is flagged (row fingerprints of the calibrate run).
    out = tmp_path / "optimistic"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(calibrated.root / "reg" / "2"),
            "--data",
            str(calibrated.data / "reg-calibration.csv"),
            "--out",
            str(out),
            "--samples",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "60 of the 60 evaluation rows are among the bundle's calibrate rows" in result.output
    assert json.loads((out / "report.json").read_text())["overlap_warnings"]


def test_a_calibrated_version_that_does_not_load_is_never_in_place(
    fresh: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What calibrate writes is loaded before it is renamed into place: one that does not load
    leaves nothing, and no registry ever sees it."""
    from service.calibration import recalibration
    from service.errors import BundleError

    seen: list[Path] = []
    real = recalibration.load_bundle

    def refuse(path: Path, *args: Any, **kwargs: Any) -> Any:
        if not path.parent.name.startswith(".calibrate-"):
            return real(path, *args, **kwargs)  # the source
        seen.append(path)
        raise BundleError(f"{path}: refused")

    repo = tmp_path / "repo"
    shutil.copytree(fresh.root / "reg" / "1", repo / "reg" / "1")
    monkeypatch.setattr(recalibration, "load_bundle", refuse)
    with pytest.raises(BundleError, match="refused"):
        recalibration.calibrate_bundle(
            repo / "reg" / "1", fresh.data / "reg-calibration.csv", repo, samples=CAL_SAMPLES
        )
    assert sorted(p.name for p in (repo / "reg").iterdir()) == ["1"]  # nothing left behind
    assert len(seen) == 1  # loaded where it was staged


def test_calibrate_a_regressor_of_two_targets_prints_each_ones_q(tmp_path: Path) -> None:
    """The summary line read cal.scores, empty when target_scores holds them: exit 1 with
    'conformal calibration needs at least one score', after version 2 was written."""
    import numpy as np
    import torch
    from nets import mlp

    from service.packaging import save

    names, targets = ["a", "b", "c"], ["systolic", "diastolic"]
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=3, hidden=16, d_out=2), torch.randn(4, 3), out_dir=tmp_path / "repo",
        name="bp", version="1", task="regression", intended_use="tests only", target=targets,
        target_unit=["mmHg", "mmHg"], feature_names=names,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).round(3)
    y = np.stack([x[:, 0] + rng.normal(size=60), 10 * rng.normal(size=60)], axis=1).round(3)
    lines = [",".join([*names, *targets])]
    lines += [",".join(repr(float(v)) for v in [*xr, *yr]) for xr, yr in zip(x, y, strict=True)]
    (tmp_path / "cal.csv").write_text("\n".join(lines) + "\n")
    args = ["calibrate", str(tmp_path / "repo" / "bp" / "1"), "--data", str(tmp_path / "cal.csv")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "repo"), "--samples", "50"])
    assert result.exit_code == 0, result.output
    line = next(li for li in result.output.splitlines() if "conformal q" in li)
    assert line.count("0.9:") == 2  # one list of levels per target


def test_the_referral_keeps_to_the_percentile_when_empty_sets_alone_exceed_it(
    tmp_path: Path,
) -> None:
    """digits at --percentile 99: empty prediction sets always referred, 4.7 % of the
    calibration rows, against the 1 % asked (and recorded as "together refer 1 %"). The set
    trigger is off when empty sets alone exceed its half."""
    import numpy as np

    from service.engine.model import ServedModel
    from service.engine.params import PredictParams

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "models" / "digits" / "1", tmp_path / "digits" / "1")
    data = root / "models" / "data" / "digits-calibration.csv"
    args = ["calibrate", str(tmp_path / "digits" / "1"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path), "--percentile", "99"])
    assert result.exit_code == 0, result.output
    served = ServedModel(load_bundle(tmp_path / "digits" / "2"), device="cpu")
    cal, policy = served.manifest.calibration, served.manifest.referral
    assert cal is not None and policy is not None and policy.max_set_size is None
    rows = read(data, served.manifest)
    pred = served.predict(rows.x, PredictParams(cal.samples, (0.95,), seed=cal.seed))
    assert pred.referral is not None
    # the budget's order statistic: at most 1 % of the rows, and one row for ties
    assert np.mean(pred.referral.refer) <= 0.01 + 1 / rows.n


def test_a_temperature_at_the_edge_of_its_range_is_warned(tmp_path: Path) -> None:
    """digits' 359 calibration rows hold 2 errors: the plain NLL minimum is the bound, 0.05,
    accepted without a word."""
    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "models" / "digits" / "1", tmp_path / "digits" / "1")
    data = root / "models" / "data" / "digits-calibration.csv"
    args = ["calibrate", str(tmp_path / "digits" / "1"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path), "--min-nll-temperature"])
    assert result.exit_code == 0, result.output
    assert "warning: the temperature (0.05) is at the edge of its range (0.05 to 20)" in (
        result.output
    )
