"""The model pages and the API docs in a real headless Chromium (Debian's `chromium`, driven by
Playwright; nothing is downloaded): fill each bundled model's form, submit, and read what the
page drew against the API's JSON for the same request; the API's error next to the field; a
hostile manifest that runs nothing; API keys typed by the user; axe-core finds no serious or
critical violation; /docs and /redoc render with every request outside 127.0.0.1 refused.

Screenshots of each model page (whole, its "try it" part, at a phone's width) go to the test's
temporary folder, or to $MCSERVE_SCREENSHOTS when set (docs/pages/ holds two; see the README).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from audio_nets import save_audio_model, tone, wav
from axe_playwright_python.sync_playwright import Axe
from hostile_pages import NAME, SCRIPT, hostile_bundle
from nets import mlp
from playwright.sync_api import sync_playwright
from server import ROOT, Server, serve
from text_nets import save_text_model
from torch import nn

from service.api.common import examples
from service.packaging import save

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "pages-test-key"
SEED = 42
AUTH = {"Authorization": f"Bearer {KEY}"}


def text_bundle(repo: Path) -> None:
    """A small text classifier with its tokenizer (the page shows it a text box)."""
    save_text_model(repo, intended_use="Demonstration, not for clinical use: tests.")


RLO = "\u202e"  # right-to-left override: reverses the text after it, up to the paragraph's end
# A feature name the page shows cut, and the API's messages quote whole (its stethoscope is
# one character to Python, two to JavaScript).
LONG = "\U0001fa7a" + "F" * 5000
# Classes JavaScript reorders ('10' and '2' first); one longer than a page shows whole.
ORDER = ["zebra", "\U0001fa7a" + "Z" * 2500, "10", "2"]


NORMED = (-0.424213, 2.821487)


def crafted_bundles(repo: Path) -> None:
    """Classes and targets JavaScript would reorder (integer-like keys first), unnamed
    features, a right-to-left override in names and units, a 5,000-character feature name."""
    torch.manual_seed(0)
    small = {"out_dir": repo, "version": "1", "intended_use": "tests only"}
    save(
        mlp(0.25, d_in=3, hidden=8, d_out=4), torch.randn(4, 3), name="order",
        task="classification", labels=ORDER, valid_ranges=[(0.0, 10.0)] * 3,
        training_ranges=[(2.0, 8.0)] * 3, **small,
    )  # fmt: skip
    save(
        mlp(0.25, d_in=2, hidden=8, d_out=3), torch.randn(4, 2), name="horizon",
        task="regression", target=["30", "7", f"{RLO}bp"],
        target_unit=["days", None, f"{RLO}mmHg"], feature_names=[f"{RLO}age", "weight"],
        units=[f"{RLO}years", "kg"], **small,
    )  # fmt: skip
    save(  # a name that starts another and its value check; one with a right-to-left mark
        mlp(0.25, d_in=3, hidden=8, d_out=2), torch.randn(4, 3), name="quote",
        task="classification", labels=["a", "b"], feature_names=["a", "a' = b", f"{RLO}age"],
        valid_ranges=[(0.0, 10.0)] * 3, training_ranges=[(2.0, 8.0)] * 3, **small,
    )  # fmt: skip
    save(  # a drawing on a normalised range (MNIST's mean and std): its ends are not round
        nn.Sequential(nn.Flatten(), mlp(0.25, d_in=16, hidden=8, d_out=2)),
        torch.randn(4, 1, 4, 4), name="normed", task="classification", labels=["a", "b"],
        value_range=NORMED, **small,
    )  # fmt: skip
    save(  # (a class of 80 letters: the probabilities' table scrolls sideways at 360 px)
        mlp(0.25, d_in=2, hidden=8, d_out=2), torch.randn(4, 2), name="long",
        task="classification", labels=["a", "W" * 80], feature_names=[LONG, "g"],
        valid_ranges=[(-10.0, 10.0)] * 2, training_ranges=[(-1.0, 1.0)] * 2, **small,
    )  # fmt: skip


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (a start costs about 20 s on two busy cores): the bundled models and the
    hostile bundle, an API key required, so every prediction below types the key."""
    tmp = tmp_path_factory.mktemp("pages-e2e")
    shutil.copytree(ROOT / "models", tmp / "models", ignore=shutil.ignore_patterns("*.py"))
    hostile_bundle(tmp / "models")
    text_bundle(tmp / "models")
    save_audio_model(tmp / "models")
    save_audio_model(tmp / "models", name="tones-any", resample=True)
    crafted_bundles(tmp / "models")
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=2, hidden=8, d_out=2), torch.randn(4, 2), out_dir=tmp / "models",
        name="bp", version="1", task="regression", intended_use="tests only",
        target=["systolic", "diastolic"], target_unit=["mm[Hg]", None],
        feature_names=["age", "weight"], valid_ranges=[(0.0, 120.0), (1.0, 300.0)],
        training_ranges=[(20.0, 80.0), (40.0, 120.0)],
    )  # fmt: skip
    key = {"id": "pages", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    env = {"MCSERVE_DRAIN_GRACE_S": "0", "MCSERVE_API_KEYS": json.dumps([key])}
    with serve(tmp, model_dir=tmp / "models", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        yield context
        context.close()


def expected(message: str) -> bool:
    """Chromium logs every refused fetch; the tests make some on purpose (422, 401)."""
    return message.startswith("Failed to load resource: the server responded with a status of 4")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page whose requests may only go to 127.0.0.1; the rest are refused and recorded, as are
    CSP violations and script errors."""
    pg = browser.new_page()
    pg.outside = []
    pg.problems = []

    def guard(route: Any) -> None:
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            pg.outside.append(route.request.url)
            route.abort()

    pg.route("**/*", guard)
    pg.on(
        "console",
        lambda m: m.type == "error" and not expected(m.text) and pg.problems.append(m.text),
    )
    pg.on("pageerror", lambda e: pg.problems.append(str(e)))
    yield pg
    assert not pg.outside, pg.outside
    assert not pg.problems, pg.problems
    pg.close()


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("MCSERVE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def fill(page: Any, name: str) -> list[Any]:
    """Type the model's example row into its form; return the instance the page will send."""
    row = examples.ROWS[name]
    if name == "digits":  # the grid cycles empty, half, full: 0, 8, 16
        levels = [min(2, round(v / 8)) for v in row]
        cells = page.locator("#grid .cell")
        for i, level in enumerate(levels):
            for _ in range(level):
                cells.nth(i).click()
        flat = [8.0 * level for level in levels]
        return [[flat[r * 8 : r * 8 + 8] for r in range(8)]]  # shape [1, 8, 8]
    for j, v in enumerate(row):
        page.fill(f"#f-{j}", repr(v))
    return row


def predict(page: Any, expect_ok: bool = True, key: str | None = KEY) -> dict[str, Any]:
    """Type the key, submit; return the body the page sent."""
    if key is not None:
        page.fill("#api-key", key)
    with page.expect_request("**/*:predict") as sent:
        page.click("#predict")
    if expect_ok:
        page.wait_for_selector("[data-out=meta]")
    body: dict[str, Any] = sent.value.post_data_json
    return body


def close(text: str, value: float | None) -> bool:
    if value is None:
        return text == "unbounded"
    return abs(float(text) - value) <= 1e-3 * max(abs(value), 1e-12)


@pytest.mark.parametrize("name", list(examples.ROWS))
def test_a_model_page_draws_what_the_api_answers(
    srv: Server, page: Any, name: str, tmp_path: Path
) -> None:
    page.set_viewport_size({"width": 1000, "height": 900})
    page.goto(f"{srv.url}/models/{name}")
    assert page.locator(".notice").inner_text().startswith("Not for clinical use")
    instance = fill(page, name)
    page.fill("#seed", str(SEED))
    sent = predict(page)
    assert sent["instances"] == [instance] and sent["parameters"]["seed"] == SEED
    api = httpx.post(
        f"{srv.url}/v1/models/{name}:predict", json=sent, headers=AUTH, timeout=60
    ).json()
    p = api["predictions"][0]
    out = page.locator("#result")
    if "mean" in p:
        assert close(out.locator("[data-out=mean]").inner_text().split()[0], p["mean"])
        text = out.locator("[data-out=interval]").first.inner_text()
        lower, upper = text[1 : text.index("]")].split(", ")
        assert close(lower, p["intervals"][0]["lower"]) and close(upper, p["intervals"][0]["upper"])
        assert close(out.locator("[data-out=epistemic]").inner_text(), p["epistemic_std"])
    else:
        assert out.locator("[data-out=label]").inner_text() == p["label"]
        for label, prob in p["probabilities"].items():
            row = out.locator(f'tr[data-class="{label}"]')
            assert close(row.locator("[data-out=probability]").inner_text(), prob)
            iv = p["intervals"][label][0]
            got = row.locator("[data-out=interval]").inner_text()
            lower, upper = got[1 : got.index("]")].split(", ")
            assert close(lower, iv["lower"]) and close(upper, iv["upper"])
        shown = out.locator("[data-out=set]").inner_text()
        labels = p["prediction_set"]["labels"]
        assert shown == (", ".join(labels) if labels else "empty: no class is likely enough")
        assert out.locator("[data-out=set] bdi").count() == len(labels)  # each label isolated
        assert close(
            out.locator("[data-out=epistemic]").inner_text(), p["uncertainty"]["mutual_information"]
        )
    referral = out.locator("[data-out=referral]")
    assert referral.locator("h4").inner_text() == (
        "Refer to a person" if p["referral"]["refer"] else "No referral"
    )
    assert referral.locator("li").all_inner_texts() == p["referral"]["reasons"]
    folder = shots(tmp_path)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    page.locator("section[aria-labelledby=try-h]").screenshot(path=str(folder / f"{name}-try.png"))
    # A phone's width: nothing wider than the screen but what scrolls inside its own box.
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.locator("#answer-h").evaluate("e => e.scrollIntoView()")  # the answer on top
    page.screenshot(path=str(folder / f"{name}-phone.png"))


def test_out_of_range_input_shows_the_api_message_by_its_field(srv: Server, page: Any) -> None:
    page.goto(f"{srv.url}/models/diabetes")
    fill(page, "diabetes")
    page.fill("#f-0", "500")  # age, valid 0 to 120 years
    sent = predict(page, expect_ok=False)
    api = httpx.post(f"{srv.url}/v1/models/diabetes:predict", json=sent, headers=AUTH, timeout=60)
    assert api.status_code == 422
    page.wait_for_selector("#e-0:not(:empty)")  # (wait_for_function's eval: the CSP refuses it)
    assert page.locator("#e-0").inner_text() == api.json()["error"]
    assert page.locator("#f-0").get_attribute("aria-invalid") == "true"
    assert page.locator("#result").inner_text() == ""


def test_a_seed_past_2_to_the_53_is_sent_and_shown_exactly(srv: Server, page: Any) -> None:
    """A JS number rounds past 2^53: the page sent 9007199254740992 for a typed ...993, and
    showed the server's own seeds (most are past 2^53) rounded, so that they replayed another
    answer."""
    page.goto(f"{srv.url}/models/diabetes")
    fill(page, "diabetes")
    seed = 2**53 + 1
    page.fill("#seed", f"00{seed}")  # leading zeros: not allowed in a JSON number
    assert predict(page)["parameters"]["seed"] == seed
    assert f"passes, seed {seed}." in page.locator("[data-out=meta]").inner_text()
    page.fill("#seed", "")
    sent = predict(page)
    assert "seed" not in sent["parameters"]
    shown = page.locator("[data-out=meta]").inner_text()
    drawn = int(shown[shown.index("seed ") + 5 :].rstrip("."))
    again = httpx.post(
        f"{srv.url}/v1/models/diabetes:predict",
        json={**sent, "parameters": {**sent["parameters"], "seed": drawn}},
        headers=AUTH,
        timeout=60,
    ).json()
    assert again["seed"] == drawn
    shown_mean = page.locator("[data-out=mean]").inner_text().split()[0]
    assert close(shown_mean, again["predictions"][0]["mean"])  # the shown seed replays it


def test_the_drawing_works_from_the_keyboard(srv: Server, page: Any) -> None:
    page.goto(f"{srv.url}/models/digits")
    page.locator("#grid .cell").first.focus()
    for key in ("ArrowRight", "ArrowDown", "Enter", "Space", "ArrowLeft", "Space"):
        page.keyboard.press(key)
    cells = page.locator("#grid .cell")
    assert cells.nth(9).get_attribute("data-value") == "16"  # row 2, column 2: full
    assert cells.nth(8).get_attribute("aria-label") == "row 2, column 1: half"
    assert page.evaluate("document.activeElement.dataset.index") == "8"
    sent = predict(page)
    flat = [v for row in sent["instances"][0][0] for v in row]
    assert flat[8] == 8.0 and flat[9] == 16.0 and sum(flat) == 24.0


def png(grey: list[list[int]]) -> bytes:
    """A greyscale PNG (8 bits, no filter) of the given rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", len(grey[0]), len(grey), 8, 0, 0, 0, 0)
    raw = b"".join(b"\0" + bytes(row) for row in grey)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_an_uploaded_image_fills_the_grid(srv: Server, page: Any) -> None:
    page.goto(f"{srv.url}/models/digits")
    page.set_input_files("#upload", {"name": "x.txt", "mimeType": "text/plain", "buffer": b"no"})
    page.wait_for_selector("#form-error:not(:empty)")
    assert page.locator("#form-error").inner_text().startswith("could not read x.txt")
    # Black diagonal on white, one pixel at grey level 50: values 16, 0 and 16 * (1 - 50/255),
    # 12.8627..., which rounding to 0.01 missed by 0.0027.
    grey = [[0 if r == c else 255 for c in range(8)] for r in range(8)]
    grey[0][7] = 50
    picture = {"name": "digit.png", "mimeType": "image/png", "buffer": png(grey)}
    page.set_input_files("#upload", picture)
    page.wait_for_selector("#grid .cell[data-index='9'][data-value='16']")
    assert page.locator("#form-error").inner_text() == ""
    flat = [v for row in predict(page)["instances"][0][0] for v in row]
    want = [16 * (1 - grey[i // 8][i % 8] / 255) for i in range(64)]
    # to 1e-4 (it was rounded to 0.01, coarser than a byte's steps on a 0-1 model)
    assert max(abs(a - b) for a, b in zip(flat, want, strict=True)) <= 5e-5 + 1e-9, flat


def test_an_uploaded_picture_stays_inside_a_range_with_odd_ends(srv: Server, page: Any) -> None:
    """Black rounded to 1e-4 was 2.8215, over the model's 2.821487: the API refused it."""
    page.goto(f"{srv.url}/models/normed")
    picture = {"name": "ink.png", "mimeType": "image/png", "buffer": png([[0] * 4] * 4)}
    page.set_input_files("#upload", picture)
    page.wait_for_selector("#grid .cell[data-index='15'][data-value]")
    flat = [v for row in predict(page)["instances"][0][0] for v in row]
    assert all(NORMED[0] <= v <= NORMED[1] for v in flat) and max(flat) == NORMED[1], flat
    assert page.locator("#form-error").inner_text() == ""


def test_a_hostile_manifest_runs_nothing(srv: Server, page: Any) -> None:
    page.goto(f"{srv.url}/models/{NAME}")
    assert SCRIPT in page.locator(".use").inner_text()  # shown as text
    predict(page)
    assert SCRIPT in page.locator("#result").inner_text()  # a label, drawn as text
    assert page.evaluate("window.__xss") is None
    assert page.locator("#result script, #result img, main svg").count() == 0


def test_with_api_keys_the_user_types_the_key(srv: Server, page: Any) -> None:
    page.goto(f"{srv.url}/models/{NAME}")
    assert KEY not in page.content()
    predict(page, expect_ok=False, key=None)
    page.wait_for_selector("#form-error:not(:empty)")
    assert page.locator("#form-error").inner_text().startswith("missing API key")
    predict(page, expect_ok=False, key="wrong")
    page.wait_for_selector("#form-error:text-is('invalid API key')")
    sent = predict(page)
    assert "instances" in sent and page.locator("#form-error").inner_text() == ""


@pytest.mark.parametrize("path", ["/models", *(f"/models/{n}" for n in [*examples.ROWS, "long"])])
def test_no_accessibility_violations(srv: Server, page: Any, path: str) -> None:
    """axe-core finds nothing, of any impact, at a desktop's width and at a phone's, with an
    answer drawn: at 360 px a probabilities' table that scrolls sideways (the long class
    name's) is a box that must be focusable and named; the Inputs table's box shared its
    section's name; the bars' column header had no text."""
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(srv.url + path)
    if path != "/models":
        predict(page)  # the drawn answer is checked too
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 800})
        if path == "/models/long" and width == 360:  # the case the box is for
            box = page.locator("#result .scroll")
            assert box.evaluate("e => e.scrollWidth > e.clientWidth")
        results = Axe().run(page)
        bad = [
            (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
            for v in results.response["violations"]
        ]
        assert not bad, (width, bad)


# ReDoc's bundle draws its maker's logo from their CDN (hard-coded, no option turns it off): the
# page's CSP refuses it in the renderer, before any network, and ReDoc then hides the image.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize(
    ("path", "ready"), [("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")]
)
def test_api_docs_render_offline(srv: Server, page: Any, path: str, ready: str) -> None:
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    page.goto(srv.url + path)
    page.wait_for_selector(f"{ready}:has-text('mcserve')", timeout=30_000)
    if path == "/docs":
        assert page.locator(".opblock").count() > 10  # the operations are listed
    else:
        page.wait_for_timeout(500)  # the logo is asked for after the first render
        refused = [m for m in page.problems if "Content Security Policy" in m]
        assert page.problems == refused and all(REDOC_LOGO in m for m in refused), page.problems
        page.problems.clear()  # the CSP's refusal, not an error
        seen[:] = [u for u in seen if u != REDOC_LOGO]
        page.outside[:] = [u for u in page.outside if u != REDOC_LOGO]
    local = {u for u in seen if u.startswith(srv.url)}
    assert f"{srv.url}/openapi.json" in local and set(seen) == local, seen


@pytest.mark.parametrize("name", ["notes", "medical-abstracts"])
def test_a_text_model_page_takes_a_text(srv: Server, page: Any, tmp_path: Path, name: str) -> None:
    """A text model (a small test one, and the bundled one) gets a text box, not a field per
    token; the page draws what the API answers for the text, says how many tokens it read and
    whether it cut the text, and puts the API's error by the box."""
    page.goto(f"{srv.url}/models/{name}")
    assert page.locator("input[data-feature]").count() == 0
    page.fill("#text", "Patient presents with chest pain and shortness of breath")
    page.fill("#seed", str(SEED))
    sent = predict(page)
    assert sent["instances"] == ["Patient presents with chest pain and shortness of breath"]
    api = httpx.post(
        f"{srv.url}/v1/models/{name}:predict", json=sent, headers=AUTH, timeout=60
    ).json()
    p = api["predictions"][0]
    out = page.locator("#result")
    assert out.locator("[data-out=label]").inner_text() == p["label"]
    for label, prob in p["probabilities"].items():
        row = out.locator(f'tr[data-class="{label}"]')
        assert close(row.locator("[data-out=probability]").inner_text(), prob)
    # The test model reads 16 tokens, so this text is cut (and the page says so); the bundled
    # one reads 900.
    assert p["truncated"] is (name == "notes")
    cut = ", cut to the model's maximum" if p["truncated"] else ""
    assert out.locator("[data-out=tokens]").inner_text() == f"{p['tokens']} tokens{cut}"
    page.locator("section[aria-labelledby=try-h]").screenshot(
        path=str(shots(tmp_path) / f"{name}-try.png")
    )
    page.fill("#text", "a\u0000b")  # a NUL: the API's own message, next to the box
    predict(page, expect_ok=False)
    page.wait_for_selector("#e-text:not(:empty)")
    assert page.locator("#e-text").inner_text() == "instance 0: the text contains a NUL character"
    # The box's maxlength counts UTF-16 units, the server's limit UTF-8 bytes: 60,000 Greek
    # letters fit the box and were sent to a 413; the page says so before sending.
    page.fill("#text", "α" * 60_000)
    page.click("#predict")
    page.wait_for_selector("#e-text:has-text('bytes of UTF-8')")
    assert page.locator("#e-text").inner_text() == (
        "the text is 120000 bytes of UTF-8, over this model's limit of 100000: shorten it"
    )
    # Not every error is the text's: the passes' goes by their field, the text stays valid.
    page.fill("#text", "chest pain")
    page.evaluate("document.getElementById('samples').removeAttribute('min')")
    page.fill("#samples", "1")
    predict(page, expect_ok=False)
    page.wait_for_selector("#samples-e:not(:empty)")
    assert "samples" in page.locator("#samples-e").inner_text()
    assert page.locator("#e-text").inner_text() == ""
    assert page.locator("#text").get_attribute("aria-invalid") is None
    page.fill("#samples", "20")
    results = Axe().run(page)
    bad = [
        v["id"] for v in results.response["violations"] if v["impact"] in ("serious", "critical")
    ]
    assert not bad, bad


def test_a_multi_output_regressor_draws_each_target(srv: Server, page: Any) -> None:
    """The card said "Predicts None" and an answer drew only "unbounded"."""
    page.goto(f"{srv.url}/models/bp")
    assert "systolic (mm[Hg]), diastolic" in page.locator("dl.facts").first.inner_text()
    page.fill("#seed", str(SEED))
    sent = predict(page)
    api = httpx.post(f"{srv.url}/v1/models/bp:predict", json=sent, headers=AUTH, timeout=60)
    targets = api.json()["predictions"][0]["targets"]
    for name, unit in (("systolic", " mm[Hg]"), ("diastolic", "")):
        head = page.locator(f'h4[data-target="{name}"]')
        assert head.inner_text() == name + (f" ({unit.strip()})" if unit else "")
        mean = page.locator(f'h4[data-target="{name}"] + dl [data-out=mean]').inner_text()
        assert mean.endswith(unit) and close(mean.removesuffix(unit), targets[name]["mean"])


def test_a_long_feature_name_fits_a_phone_and_its_error_lands_by_its_field(
    srv: Server, page: Any
) -> None:
    """A 5,000-character feature name, quoted whole by the referral's reason and the API's
    error, made the page 46,000 px wide at 360 px; and the error, which names the feature
    whole, was not matched to its field (the field holds the name cut)."""
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{srv.url}/models/long")
    page.fill("#f-0", "5")  # outside the training range: referred, the reason names it
    predict(page)
    assert LONG in page.locator("[data-out=referral] li").first.inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.fill("#f-0", "50")  # outside the valid range: the API's 422
    sent = predict(page, expect_ok=False)
    api = httpx.post(f"{srv.url}/v1/models/long:predict", json=sent, headers=AUTH, timeout=60)
    assert api.status_code == 422 and LONG in api.json()["error"]
    page.wait_for_selector("#e-0:not(:empty)")
    assert page.locator("#e-0").inner_text() == api.json()["error"]
    assert page.locator("#e-0 bdi").inner_text() == LONG  # the name isolated in the message
    assert page.locator("#f-0").get_attribute("aria-invalid") == "true"
    assert page.locator("#form-error").inner_text() == ""
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.fill("#f-0", "")  # the page's own message (nothing is sent), by the field too
    page.click("#predict")
    page.wait_for_selector("#e-0:not(:empty)")
    assert page.locator("#e-0").inner_text() == "this field needs a number"


def test_an_answer_is_drawn_in_the_manifests_order(srv: Server, page: Any) -> None:
    """Object.entries put integer-like keys first: '10' and '2' before 'zebra', '7' before
    '30'. The API answers in the manifest's order, and the page draws in it (the page holds
    the first 2,000 characters of a class: the long one is placed by those)."""
    page.goto(f"{srv.url}/models/order")
    sent = predict(page)
    api = httpx.post(f"{srv.url}/v1/models/order:predict", json=sent, headers=AUTH, timeout=60)
    assert list(api.json()["predictions"][0]["probabilities"]) == ORDER
    rows = page.locator("table.probs tbody tr")
    assert [rows.nth(i).get_attribute("data-class") for i in range(4)] == ORDER
    page.goto(f"{srv.url}/models/horizon")
    predict(page)
    heads = page.locator("h4[data-target]")
    assert [heads.nth(i).get_attribute("data-target") for i in range(3)] == ["30", "7", f"{RLO}bp"]


def test_a_right_to_left_mark_in_a_target_stays_in_its_name(srv: Server, page: Any) -> None:
    """U+202E in a target's name or unit reversed the rest of the answer's heading: each is
    in its own <bdi>, and the heading reads name then unit, left to right."""
    page.goto(f"{srv.url}/models/horizon")
    predict(page)
    head = page.locator(f'h4[data-target="{RLO}bp"]')
    assert head.inner_text() == f"{RLO}bp ({RLO}mmHg)"
    parts = head.locator("bdi")
    assert parts.all_inner_texts() == [f"{RLO}bp", f"{RLO}mmHg"]
    name, unit = (parts.nth(i).bounding_box() for i in range(2))
    assert name["x"] + name["width"] <= unit["x"]  # the unit drawn after the name
    assert page.locator('h4[data-target="7"] bdi').all_inner_texts() == ["7"]  # no unit


def test_each_error_lands_by_its_own_field(srv: Server, page: Any) -> None:
    """Unnamed features: the form said x1 where the API says element 1, so its message went
    above the result. The seed's and the confidence's went there too (only the passes had a
    box of their own)."""
    page.goto(f"{srv.url}/models/order")
    assert page.locator("label[for=f-1]").inner_text() == "element 1"
    page.fill("#f-1", "50")  # valid 0 to 10
    sent = predict(page, expect_ok=False)
    api = httpx.post(f"{srv.url}/v1/models/order:predict", json=sent, headers=AUTH, timeout=60)
    page.wait_for_selector("#e-1:not(:empty)")
    assert page.locator("#e-1").inner_text() == api.json()["error"]
    assert api.json()["error"].startswith("instance 0, element 1 = 50 is outside")
    assert page.locator("#f-1").get_attribute("aria-invalid") == "true"
    assert page.locator("#form-error").inner_text() == ""
    page.fill("#f-1", "5")
    page.fill("#seed", "-1")  # the page's own check: nothing is sent
    page.click("#predict")
    page.wait_for_selector("#seed-e:not(:empty)")
    assert page.locator("#seed-e").inner_text() == "the seed is a whole number, 0 or more"
    assert page.locator("#seed").get_attribute("aria-invalid") == "true"
    assert page.locator("#f-1").get_attribute("aria-invalid") is None
    page.fill("#seed", "")
    page.fill("#confidence", "1.5")  # the API's check
    sent = predict(page, expect_ok=False)
    api = httpx.post(f"{srv.url}/v1/models/order:predict", json=sent, headers=AUTH, timeout=60)
    assert api.status_code == 422
    page.wait_for_selector("#confidence-e:not(:empty)")
    assert page.locator("#confidence-e").inner_text() == api.json()["error"]
    assert page.locator("#confidence").get_attribute("aria-invalid") == "true"
    assert (
        page.locator("#seed-e").inner_text() == ""
        and page.locator("#form-error").inner_text() == ""
    )


def test_an_error_lands_by_the_field_it_names_and_a_reason_keeps_its_name(
    srv: Server, page: Any
) -> None:
    """The API's "feature 'a' = b' = 50 is outside ..." was put by feature "a" (the first
    field whose name the message starts with); a referral reason naming "\u202eage" read
    reversed (only field errors isolated the name)."""
    page.goto(f"{srv.url}/models/quote")
    for i, value in enumerate(("5", "50", "5")):
        page.fill(f"#f-{i}", value)
    predict(page, expect_ok=False)
    page.wait_for_selector("#e-1:not(:empty)")
    assert page.locator("#e-1").inner_text().startswith("instance 0, feature 'a' = b' = 50 is")
    assert page.locator("#f-1").get_attribute("aria-invalid") == "true"
    assert page.locator("#e-0").inner_text() == ""
    assert page.locator("#f-0").get_attribute("aria-invalid") is None
    page.fill("#f-1", "5")
    page.fill("#f-2", "9")  # valid, but outside the training range: a referral reason
    predict(page)
    reason = page.locator('[data-out="referral"] li').first
    assert reason.locator("bdi").all_inner_texts() == [f"{RLO}age"]
    assert reason.inner_text().startswith(f"feature '{RLO}age' = 9 outside the training range")


def test_what_a_field_holds_is_sent_as_typed_or_refused(srv: Server, page: Any) -> None:
    """Review PG2: a number field in an English browser took "4,5" for 45 and sent it; an
    option the browser could not read ("42-") was left out without a word, its default used; a
    level of 0.9996 read "100 %"; a field's error was not announced when its field already had
    the focus; the JSON link gave a bare 401 on a server with API keys, unsaid."""
    page.goto(f"{srv.url}/models/diabetes")
    assert "(needs an API key: this server requires one)" in page.locator("main").inner_text()
    fill(page, "diabetes")
    page.fill("#f-2", "4,5")
    page.click("#predict")
    page.wait_for_selector("#e-2:not(:empty)")
    assert page.locator("#e-2").inner_text() == "write a decimal point: 4.5, not 4,5"
    assert page.locator("#e-2").get_attribute("role") == "alert"  # announced where it is
    page.fill("#f-2", "1,000")  # a thousand, or one: asked, never guessed
    page.click("#predict")
    page.wait_for_selector("#e-2:text('without a comma')")
    assert page.locator("#e-2").inner_text() == (
        "write the number without a comma: 1000 (or, if the comma is a decimal point, 1.000)"
    )
    page.fill("#f-2", "0,500")  # a leading zero: no thousands, a decimal comma
    page.click("#predict")
    page.wait_for_selector("#e-2:text('decimal point')")
    assert page.locator("#e-2").inner_text() == "write a decimal point: 0.500, not 0,500"
    page.fill("#f-2", "1,000,000.5")  # no decimal-comma reading offered that is no number
    page.click("#predict")
    page.wait_for_selector("#e-2:text('without commas')")
    assert page.locator("#e-2").inner_text() == "write the number without commas: 1000000.5"
    fill(page, "diabetes")
    page.type("#seed", "42-")  # not a number: the browser's value is ""
    page.click("#predict")
    page.wait_for_selector("#seed-e:not(:empty)")
    assert page.locator("#seed-e").inner_text() == "the seed is a whole number, 0 or more"
    page.fill("#seed", str(SEED))
    for level, said in (("0.9996", "99.96"), ("0.9999999", "99.99999")):
        page.fill("#confidence", level)
        sent = predict(page)
        assert sent["parameters"]["confidence"] == float(level)
        assert sent["parameters"]["seed"] == SEED
        shown = page.locator("main").inner_text()
        assert f"at {said} %" in shown and "at 100 %" not in shown


def test_an_audio_model_page_takes_a_wav_file(srv: Server, page: Any, tmp_path: Path) -> None:
    """An audio model gets a file picker: the page sends the WAV file in base64, draws what the
    API answers for it and how long the clip was, puts the API's error by the picker, and
    axe-core finds nothing on it."""
    page.goto(f"{srv.url}/models/tones")
    assert page.locator("input[data-feature]").count() == 0
    page.fill("#seed", str(SEED))
    page.click("#predict")  # nothing chosen: said by the picker, nothing sent
    page.wait_for_selector("#e-audio:not(:empty)")
    assert page.locator("#e-audio").inner_text() == "choose a WAV file first"
    clip = wav(tone(2500.0, 0.3))
    page.set_input_files("#audio", {"name": "a.wav", "mimeType": "audio/wav", "buffer": clip})
    sent = predict(page)
    assert sent["instances"] == [{"b64": base64.b64encode(clip).decode()}]
    api = httpx.post(f"{srv.url}/v1/models/tones:predict", json=sent, headers=AUTH, timeout=60)
    p = api.json()["predictions"][0]
    out = page.locator("#result")
    assert out.locator("[data-out=label]").inner_text() == p["label"] == "high"
    for label, prob in p["probabilities"].items():
        row = out.locator(f'tr[data-class="{label}"]')
        assert close(row.locator("[data-out=probability]").inner_text(), prob)
    assert out.locator("[data-out=seconds]").inner_text() == "0.3 s of audio"
    results = Axe().run(page)
    assert not [v["id"] for v in results.response["violations"]]
    page.locator("section[aria-labelledby=try-h]").screenshot(
        path=str(shots(tmp_path) / "tones-try.png")
    )
    other = wav(tone(400.0, 0.3, rate=16000), rate=16000)  # the API's own message, by the picker
    page.set_input_files("#audio", {"name": "b.wav", "mimeType": "audio/wav", "buffer": other})
    predict(page, expect_ok=False)
    page.wait_for_selector("#e-audio:not(:empty)")
    assert (
        page.locator("#e-audio")
        .inner_text()
        .startswith("instance 0: the clip is sampled at 16000 Hz; this model reads 8000 Hz")
    )
    # A model whose bundle resamples takes the same file, and its page says it was resampled.
    page.goto(f"{srv.url}/models/tones-any")
    assert "another rate is resampled" in page.locator("#audio-h").inner_text()
    page.fill("#seed", str(SEED))
    page.set_input_files("#audio", {"name": "b.wav", "mimeType": "audio/wav", "buffer": other})
    predict(page)
    shown = page.locator("#result [data-out=seconds]").inner_text()
    assert shown == "0.3 s of audio, resampled from 16000 Hz"
