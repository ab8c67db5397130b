"""Model pages and the API docs, in process: what the HTML says, its CSP, escaping of hostile
manifests, evaluations matched by digest, the switch, the OpenAPI entries. (The browser runs the
pages' script in tests/e2e/test_pages_browser.py.)"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
from apps import asgi_client, running
from fastapi import FastAPI
from hostile_pages import IMG, NAME, QUOTE, SCRIPT, hostile_bundle
from nets import mlp

from service.api.app import create_app
from service.packaging import save
from service.settings import Settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@pytest_asyncio.fixture(scope="module")
async def hostile(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """An app serving the hostile bundle, with an evaluation directory the tests fill."""
    root = tmp_path_factory.mktemp("pages")
    hostile_bundle(root / "models")
    settings = Settings(model_dir=root / "models", evaluation_dir=root / "evaluation")
    async with running(settings) as app, asgi_client(app) as c:
        yield c


def evaluation_dir(client: httpx.AsyncClient) -> Path:
    app = client._transport.app  # type: ignore[attr-defined]
    path: Path = app.state.mcserve.settings.evaluation_dir
    return path


class Tags(HTMLParser):
    """The elements of a page as a browser's tokenizer sees them: (tag, attributes)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def check_no_script_but_ours(html: str) -> None:
    """Scripts only from /static, no event-handler attribute, no element a payload makes."""
    tags = Tags(html).tags
    scripts = [a for t, a in tags if t == "script"]
    assert all((a.get("src") or "").startswith("/static/") for a in scripts), scripts
    handlers = [(t, a) for t, a in tags if any(k.startswith("on") for k in a)]
    assert not handlers, handlers
    assert not [t for t, _ in tags if t == "svg"] and ("img", {"src": "x"}) not in tags


async def test_model_page_is_the_card_and_a_form(client: httpx.AsyncClient) -> None:
    r = await client.get("/models/clf")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    html = r.text
    check_no_script_but_ours(html)
    meta = (await client.get("/v1/models/clf")).json()
    assert meta["digest"] in html and "tests only" in html
    assert 'data-predict-url="/v1/models/clf/versions/1:predict"' in html
    # A field per feature, its unit in the label, valid and training ranges in its hint.
    assert re.search(r'<label for="f-0">f0 <span class="unit">\(cm\)</span>', html)
    assert "valid -10 to 10; training -3 to 3" in html
    # A text field read as a decimal by the page (a number field took "4,5" for 45).
    assert re.search(r'<input id="f-0"[^>]* type="text" inputmode="decimal"', html)
    assert 'id="no-evaluation"' in html  # the tiny bundles have none
    assert "Not for clinical use" not in html  # their intended use does not say so
    assert "not calibrated" in html


async def test_list_page_links_every_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/models")
    assert r.status_code == 200
    for name in ("clf", "reg"):
        assert f'href="/models/{name}"' in r.text
        assert f'href="/models/{name}/versions/1"' in r.text


async def test_unknown_model_is_an_html_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/models/<b>nope")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "model &#39;&lt;b&gt;nope&#39; is not loaded" in r.text
    assert "content-security-policy" in r.headers
    assert (await client.get("/models/clf/versions/9")).status_code == 404


async def test_hostile_manifest_strings_render_as_text(hostile: httpx.AsyncClient) -> None:
    html = (await hostile.get(f"/models/{NAME}")).text
    check_no_script_but_ours(html)
    for payload in (SCRIPT, IMG, QUOTE):
        assert payload not in html
    assert "&lt;script&gt;window.__xss = &#39;script&#39;&lt;/script&gt;" in html
    assert "Not for clinical use" in html  # read from the intended use, whatever else it holds
    # Each label in its own <bdi>: a right-to-left mark in one cannot reverse the others.
    assert html.count("<dt>Classes</dt><dd><bdi>&lt;script&gt;") == 1
    listing = (await hostile.get("/models")).text
    check_no_script_but_ours(listing)
    assert SCRIPT not in listing


async def test_evaluation_is_shown_only_for_the_served_digest(hostile: httpx.AsyncClient) -> None:
    digest = (await hostile.get(f"/v1/models/{NAME}")).json()["digest"]
    place = evaluation_dir(hostile) / NAME
    place.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"digest": "sha256:" + "0" * 64},
        "data": {"file": "t.csv", "rows": 7},
        "served": {"accuracy": 0.5, "nll": 0.7, "brier": 0.25, "ece": 0.125},
        "warnings": [SCRIPT],
    }
    (place / "report.json").write_text(json.dumps(report))
    (place / "reliability.png").write_bytes(PNG)
    plot = f"/models/{NAME}/versions/1/plots/reliability.png"
    html = (await hostile.get(f"/models/{NAME}")).text
    assert 'id="no-evaluation"' in html  # another bundle's report is not this one's
    assert (await hostile.get(plot)).status_code == 404

    report["model"] = {"digest": digest}
    (place / "report.json").write_text(json.dumps(report))
    html = (await hostile.get(f"/models/{NAME}")).text
    assert 'id="no-evaluation"' not in html
    assert "<dt>test rows</dt><dd>7 (t.csv)</dd>" in html and "<dd>0.125</dd>" in html
    assert f'<img src="{plot}"' in html and SCRIPT not in html
    r = await hostile.get(plot)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == PNG and r.headers["x-content-type-options"] == "nosniff"
    (place / "reliability.png").write_bytes(b"<html><script>alert(1)</script>")  # not a PNG
    assert (await hostile.get(plot)).status_code == 404
    (place / "reliability.png").write_bytes(PNG)
    for bad in ("coverage.png", "report.png", "..%2Freport.json"):  # only plots that exist
        assert (await hostile.get(f"/models/{NAME}/versions/1/plots/{bad}")).status_code == 404


async def test_pages_can_be_switched_off(repo: Path) -> None:
    def pages(settings: Settings) -> list[str]:
        return [p for p in create_app(settings).openapi()["paths"] if p.startswith("/models")]

    assert len(pages(Settings(model_dir=repo))) == 4  # on by default
    assert pages(Settings(model_dir=repo, pages=False)) == []
    async with running(Settings(model_dir=repo, pages=False)) as on, asgi_client(on) as c:
        assert (await c.get("/models/clf")).status_code == 404
        assert (await c.get("/docs")).status_code == 200  # the API docs stay


def test_pages_are_in_the_openapi_document_as_html(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    for path in ("/models", "/models/{name}", "/models/{name}/versions/{version}"):
        content = paths[path]["get"]["responses"]["200"]["content"]
        assert list(content) == ["text/html"], (path, content)
    plots = paths["/models/{name}/versions/{version}/plots/{plot}.png"]["get"]["responses"]
    assert list(plots["200"]["content"]) == ["image/png"]
    assert list(plots["404"]["content"]) == ["text/html"]


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_api_docs_load_only_assets_of_this_server(
    client: httpx.AsyncClient, path: str
) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    check_no_script_but_ours(r.text)
    csp = r.headers["content-security-policy"]
    assert re.search(r"script-src 'self';", csp) and "connect-src 'self'" in csp
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert len(assets) >= 2 and all(a.startswith("/static/") for a in assets), assets
    for asset in assets:
        got = await client.get(asset)
        assert got.status_code == 200 and len(got.content) > 100, asset
        assert got.headers["x-content-type-options"] == "nosniff", asset


async def test_bundled_models_show_their_evaluation_reports() -> None:
    """docs/evaluation holds the reports of the calibrated copies (version 2): their pages show
    the plots; version 1 (another digest) says it has no evaluation."""
    root = Path(__file__).resolve().parents[2]
    settings = Settings(model_dir=root / "models", evaluation_dir=root / "docs" / "evaluation")
    plots = {"breast-cancer": "reliability", "diabetes": "coverage", "digits": "risk_coverage"}
    async with running(settings) as app, asgi_client(app) as c:
        for name, plot in plots.items():
            html = (await c.get(f"/models/{name}")).text
            assert "version 2" in html and 'id="no-evaluation"' not in html, name
            url = f"/models/{name}/versions/2/plots/{plot}.png"
            assert f'<img src="{url}"' in html
            assert (await c.get(url)).content.startswith(b"\x89PNG")
            assert 'id="no-evaluation"' in (await c.get(f"/models/{name}/versions/1")).text


async def test_a_very_long_manifest_string_is_cut(tmp_path: Path) -> None:
    """Manifest strings have no length limit: a 100 kB word made the page 1.6 million pixels
    wide and took Chromium up to 73 s to lay out. Pages show 2,000 characters and say so."""
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=2, hidden=4, d_out=2), torch.randn(4, 2), out_dir=tmp_path / "models",
        name="long", version="1", task="classification", intended_use="w" * 100_000,
        labels=["a" * 5000, "b"],
    )  # fmt: skip
    settings = Settings(model_dir=tmp_path / "models", evaluation_dir=None)
    async with running(settings) as app, asgi_client(app) as c:
        for url in ("/models/long", "/models"):
            html = (await c.get(url)).text
            assert "w" * 2001 not in html and "a" * 2001 not in html, url
            assert "(cut: 100,000 characters in all)" in html, url
            assert len(html) < 40_000, url


async def test_a_report_of_the_wrong_types_shows_dashes_not_a_500(
    hostile: httpx.AsyncClient,
) -> None:
    """A report is data from a file: 5 where a list belongs, or a 400-digit integer (Python's
    json reads it; float() refuses it), made the whole page a 500."""
    digest = (await hostile.get(f"/v1/models/{NAME}")).json()["digest"]
    place = evaluation_dir(hostile) / NAME
    place.mkdir(parents=True, exist_ok=True)
    cases = [
        ({"warnings": 5, "served": {"accuracy": 0.5}}, "<dd>0.5</dd>"),
        ({"served": {"accuracy": "high"}, "prediction_sets": 3}, "<dt>accuracy</dt><dd>–</dd>"),
        ({"rmse": 10**400, "mae": float("inf")}, "<dt>rmse</dt><dd>–</dd>"),
    ]
    for fields, shown in cases:
        report = {"model": {"digest": digest}, **fields}
        (place / "report.json").write_text(json.dumps(report))
        r = await hostile.get(f"/models/{NAME}")
        assert r.status_code == 200, (fields, r.text[-300:])
        assert shown in r.text, fields
    assert "<dt>mae</dt><dd>unbounded</dd>" in r.text
    (place / "report.json").unlink()


async def test_a_calibration_fit_with_a_string_for_a_number_renders(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "models" / "medical-abstracts" / "9", tmp_path / "m" / "text" / "9")
    path = tmp_path / "m" / "text" / "9" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["name"] = "text"
    manifest["calibration"]["fit"] |= {"cv_folds": "five", "cv_nll_vector": "low"}
    path.write_text(json.dumps(manifest))
    settings = Settings(model_dir=tmp_path / "m", evaluation_dir=None)
    async with running(settings) as app, asgi_client(app) as c:
        r = await c.get("/models/text")
    assert r.status_code == 200, r.text[-300:]
    assert "(asked: auto; –-fold cross-validated NLL: temperature 0.9906, vector –)" in r.text


async def test_the_list_page_says_why_without_the_servers_paths(tmp_path: Path) -> None:
    """GET /v1/models says why a bundle is not ready without the server's paths; the list
    page, which takes no API key, showed the absolute path."""
    (tmp_path / "m" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "m" / "broken" / "1" / "manifest.json").write_text("{not json")
    settings = Settings(model_dir=tmp_path / "m", evaluation_dir=None)
    async with running(settings) as app, asgi_client(app) as c:
        html = (await c.get("/models")).text
        said = (await c.get("/v1/models")).json()["models"][0]["versions"][0]["reason"]
    assert str(tmp_path) not in html
    assert "broken/1/manifest.json: not valid JSON" in html and said.startswith("broken/1/")
