"""Model pages in process (no browser): evaluation reports that broke or swamped the page, the
form made from an input's shape and names, HEAD on the pages, names isolated with <bdi>, each
option's own error box. (The browser runs the pages' script in test_pages_browser.py.)"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from nets import mlp
from torch import nn

from service.api.app import create_app
from service.api.pages import evaluations
from service.api.pages.routes import _default
from service.packaging import save
from service.settings import Settings

RLO = "\u202e"  # right-to-left override: reverses the text after it, up to the paragraph's end
AN_HOUR_AGO = time.time() - 3600


@asynccontextmanager
async def pages(root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An app serving root/models (lifespan run), reports under root/evaluation."""
    settings = Settings(model_dir=root / "models", evaluation_dir=root / "evaluation")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def small(root: Path, name: str, d_in: int = 3, **kwargs: Any) -> None:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {"task": "classification", "labels": ["a", "b"]}
    save(
        mlp(0.25, d_in=d_in, hidden=4, d_out=len(kwargs.get("target") or defaults["labels"])),
        torch.randn(4, d_in), out_dir=root / "models", name=name, version="1",
        intended_use="tests only", **{**defaults, **kwargs},
    )  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pages-in-process")
    small(root, "clf")
    torch.manual_seed(0)
    names = [f"visit{t}_{k}" for t in (1, 2) for k in ("sbp", "dbp", "hr", "age")]
    for name, feature_names, shape in (
        ("seq", names, (2, 4)),  # two visits' measurements
        ("grid", None, (2, 4)),  # unnamed: a drawing
        ("channel", names, (1, 2, 4)),  # one channel: a drawing, names or not (the digits')
    ):
        save(
            nn.Sequential(nn.Flatten(), mlp(0.25, d_in=8, hidden=4, d_out=1)),
            torch.randn(4, *shape), out_dir=root / "models", name=name, version="1",
            task="regression", intended_use="tests only", target="y",
            feature_names=feature_names, valid_ranges=[(0.0, 300.0)] * 8,
        )  # fmt: skip
    twelve = [f"{k}_{t}" for t in (1, 2, 3) for k in ("sbp", "dbp", "hr", "age")]
    for name, shape, extra in (
        # one channel, but each named measurement with its own ranges: fields
        ("visits", (1, 3, 4), {"feature_names": twelve, "training_ranges": [(40.0, 200.0)] * 12,
                               "valid_ranges": [(0.0, 300.0), (0.0, 200.0)] * 6}),
        ("row", (1, 3), {"valid_ranges": [(0.0, 120.0)] * 3}),  # a 1 x 3 row: fields
        # one channel of pixels, each with the same training range: still a drawing
        ("pixels", (1, 2, 4), {"training_ranges": [(0.0, 1.0)] * 8,
                               "valid_ranges": [(0.0, 1.0)] * 8}),
    ):  # fmt: skip
        n = int(torch.tensor(shape).prod())
        save(
            nn.Sequential(nn.Flatten(), mlp(0.25, d_in=n, hidden=4, d_out=1)),
            torch.randn(4, *shape), out_dir=root / "models", name=name, version="1",
            task="regression", intended_use="tests only", target="y", **extra,
        )  # fmt: skip
    small(
        root, "rtl", d_in=2, task="regression", labels=None, target=[f"{RLO}sys", "dia"],
        target_unit=[f"{RLO}mmHg", "kPa"], feature_names=[f"{RLO}age", "weight"],
        units=[f"{RLO}years", "kg"],
    )  # fmt: skip
    return root


def place(root: Path) -> Path:
    folder = root / "evaluation" / "clf"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def digest(c: httpx.AsyncClient) -> str:
    d: str = (await c.get("/v1/models/clf")).json()["digest"]
    return d


async def test_a_report_nested_too_deep_is_no_evaluation(root: Path) -> None:
    """1,000 brackets in 2 kB made json.loads raise RecursionError: the model page, the version
    page and the plots answered 500. Nested 100 deep it parses, but no report is: also none."""
    folder = place(root)
    async with pages(root) as c:
        deep = {"model": {"digest": await digest(c)}, "x": []}
        inner = deep["x"]
        for _ in range(100):
            inner.append([])
            inner = inner[0]
        (folder / "reliability.png").write_bytes(evaluations.PNG_SIGNATURE + b"\0" * 8)
        for text in ("[" * 1000 + "]" * 1000, json.dumps(deep)):
            (folder / "report.json").write_text(text)
            for url in ("/models/clf", "/models/clf/versions/1"):
                r = await c.get(url)
                assert r.status_code == 200 and 'id="no-evaluation"' in r.text, (url, r.text[-300:])
            assert (await c.get("/models/clf/versions/1/plots/reliability.png")).status_code == 404
        deep["x"] = [[["three deep"]]]  # the same report, not so deep: shown
        (folder / "report.json").write_text(json.dumps(deep))
        html = (await c.get("/models/clf")).text
        assert 'id="no-evaluation"' not in html
        assert (await c.get("/models/clf/versions/1/plots/reliability.png")).status_code == 200
    for f in folder.iterdir():
        f.unlink()


async def test_a_report_of_a_million_warnings_is_cut_and_read_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A legal 4 MB report of ~1M warnings made a 24 MB page and was parsed on every view."""
    folder = place(root)
    parsed: list[bytes] = []
    parse: Callable[[bytes], Any] = evaluations._parse
    monkeypatch.setattr(evaluations, "_parse", lambda raw: parsed.append(raw) or parse(raw))
    monkeypatch.setattr(evaluations, "SETTLE_S", 0.0)  # kept at once (ctime cannot be set back)
    report = folder / "report.json"
    async with pages(root) as c:
        many = {"model": {"digest": await digest(c)}, "warnings": ["x"] * 990_000}
        report.write_text(json.dumps(many, separators=(",", ":")))
        assert report.stat().st_size <= evaluations.MAX_REPORT_BYTES
        os.utime(report, (AN_HOUR_AGO, AN_HOUR_AGO))
        for _ in range(3):
            r = await c.get("/models/clf")
            assert r.status_code == 200 and len(r.content) < 100_000, len(r.content)
            assert r.text.count('<p class="warning">x</p>') == evaluations.MAX_SHOWN_ROWS
            assert f"{990_000 - evaluations.MAX_SHOWN_ROWS:,} more warnings are left out" in r.text
        assert len(parsed) == 1  # read once: its mtime and size did not change
        many["warnings"] = ["y"]  # rewritten: read again
        report.write_text(json.dumps(many))
        os.utime(report, (AN_HOUR_AGO + 1, AN_HOUR_AGO + 1))
        html = (await c.get("/models/clf")).text
        assert '<p class="warning">y</p>' in html and "left out" not in html
        assert len(parsed) == 2
        # Changed less than SETTLE_S ago: not kept (a change within the clock's step could keep
        # its ctime).
        monkeypatch.setattr(evaluations, "SETTLE_S", 3600.0)
        report.write_text(json.dumps({**many, "warnings": ["w"]}))
        for _ in range(2):
            await c.get("/models/clf")
        assert len(parsed) == 4
        report.write_text(json.dumps({**many, "warnings": ["z"]}))
        assert '<p class="warning">z</p>' in (await c.get("/models/clf")).text
        assert '<p class="warning">z</p>' in (await c.get("/models/clf")).text
        assert len(parsed) == 6
    report.unlink()


async def test_a_report_replaced_with_the_same_mtime_and_size_is_read_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache was keyed by mtime and size: a report replaced by a copy that kept them (cp -p,
    rsync -a) went on showing the old numbers."""
    monkeypatch.setattr(evaluations, "SETTLE_S", 0.0)
    folder = place(root)
    report = folder / "report.json"
    async with pages(root) as c:
        for accuracy in ("0.91", "0.42"):
            body = {"model": {"digest": await digest(c)}, "warnings": [f"accuracy {accuracy}"]}
            staged = folder / "new.json"
            staged.write_text(json.dumps(body))
            os.utime(staged, (AN_HOUR_AGO, AN_HOUR_AGO))
            os.replace(staged, report)
            assert f"accuracy {accuracy}" in (await c.get("/models/clf")).text
    report.unlink()


def test_a_kept_report_holds_its_strings_as_a_page_shows_them() -> None:
    """A 3.9 MB report kept 3.9 M characters for a page that shows 2,000 of a string."""
    from service.api.common.html import MAX_SHOWN

    raw = json.dumps({"model": {}, "warnings": ["w" * 3_000_000], "served": {}}).encode()
    report = evaluations._parse(raw)
    assert report is not None and len(report.warnings[0]) == MAX_SHOWN + 1


async def test_named_features_are_fields_whatever_the_shape(root: Path) -> None:
    """An input of shape [2, 4] with feature names was drawn as a 2 x 4 grid: the names, ranges
    and Inputs table were gone. Unnamed, or of shape [1, 2, 4], it is a drawing."""
    async with pages(root) as c:
        html = (await c.get("/models/seq")).text
        drawings = [(await c.get(f"/models/{name}")).text for name in ("grid", "channel")]
    assert 'id="grid"' not in html and html.count("data-feature=") == 8
    assert '<label for="f-7">visit2_age</label>' in html
    assert '<th scope="row">visit1_dbp</th>' in html and "valid 0 to 300" in html
    for drawing in drawings:
        assert 'id="grid" data-rows="2" data-cols="4"' in drawing and "data-feature" not in drawing
    # A channel of named measurements with their own ranges was a 3 x 4 grid of one range, and
    # a [1, 3] row a 1 x 3 grid whose cells could hold 0, 60 or 120 only.
    async with pages(root) as c:
        visits, row = [(await c.get(f"/models/{name}")).text for name in ("visits", "row")]
    assert 'id="grid"' not in visits and visits.count("data-feature=") == 12
    assert '<label for="f-11">age_3</label>' in visits and "valid 0 to 200" in visits
    assert 'id="grid"' not in row and row.count("data-feature=") == 3


async def test_an_image_with_one_training_range_is_a_drawing_and_defaults_are_the_apis(
    root: Path,
) -> None:
    """Pixels with training ranges (for the extrapolation referral) lost their grid, though all
    share one range; and a classifier's page said "gaussian intervals" where the API uses (and
    only takes) quantile ones."""
    async with pages(root) as c:
        pixels = (await c.get("/models/pixels")).text
        clf = (await c.get("/models/clf")).text
        api = (await c.get("/v1/models/clf")).json()["defaults"]["interval"]
    assert 'id="grid" data-rows="2" data-cols="4"' in pixels and "data-feature" not in pixels
    assert api == "quantile" and "quantile intervals" in clf and "gaussian intervals" not in clf


async def test_unnamed_features_are_called_as_the_api_calls_them(root: Path) -> None:
    """The form said x1 where the API's message says element 1; and each option has a box
    for its own error (only the passes had one)."""
    async with pages(root) as c:
        html = (await c.get("/models/clf")).text
    assert '<label for="f-1">element 1</label>' in html and 'data-feature="element 1"' in html
    for option in ("samples", "seed", "confidence"):
        assert re.search(rf'<input id="{option}"[^>]* aria-describedby="{option}-e"', html)
        assert f'<span id="{option}-e" class="field-error" role="alert"></span>' in html


async def test_a_right_to_left_mark_in_a_name_stays_in_it(root: Path) -> None:
    """U+202E in a target, feature or unit reversed the text after it: the Predicts line and
    the field's label."""
    async with pages(root) as c:
        html = (await c.get("/models/rtl")).text
    assert (
        f"<dt>Predicts</dt><dd><bdi>{RLO}sys</bdi> (<bdi>{RLO}mmHg</bdi>), dia (kPa)</dd>" in html
    )
    assert (
        f'<label for="f-0"><bdi>{RLO}age</bdi> <span class="unit">(<bdi>{RLO}years</bdi>)</span>'
        in html
    )


@pytest.mark.parametrize(
    ("train", "valid", "start"),
    [
        (None, (100.0, float("inf")), "100"),  # was 0: outside the valid range
        (None, (float("-inf"), 0.1234567), "0.1234567"),  # whole: rounded it would be outside
        ((20.0, 80.0), (0.0, 120.0), "50"),
        ((float("-inf"), float("inf")), (0.0, 10.0), "5"),
        ((float("-inf"), 80.0), None, "80"),
        (None, None, "0"),
        (None, (float("-inf"), float("inf")), "0"),
    ],
)
def test_a_field_starts_inside_a_range_open_at_one_end(
    train: tuple[float, float] | None, valid: tuple[float, float] | None, start: str
) -> None:
    assert _default(train, valid) == start


async def test_the_pages_answer_head(root: Path) -> None:
    """HEAD on a page was a 405 (GET only)."""
    folder = place(root)
    async with pages(root) as c:
        (folder / "report.json").write_text(json.dumps({"model": {"digest": await digest(c)}}))
        (folder / "coverage.png").write_bytes(evaluations.PNG_SIGNATURE)
        plot = "/models/clf/versions/1/plots/coverage.png"
        for url in ("/models", "/models/clf", "/models/clf/versions/1", plot, "/docs", "/redoc"):
            got, head = await c.get(url), await c.head(url)
            assert (got.status_code, head.status_code) == (200, 200), url
            assert head.headers["content-type"] == got.headers["content-type"], url
            assert head.content == b"", url
        assert (await c.head("/models/nope")).status_code == 404
        doc = (await c.get("/openapi.json")).json()["paths"]
        assert all(list(doc[p]) == ["get"] for p in doc if p.startswith("/models")), doc
    for f in folder.iterdir():
        f.unlink()
