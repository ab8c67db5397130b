"""A page per model (HTML): the model card, its calibration and evaluation, and a form to try it.

GET /models lists the models; /models/{name}[/versions/{v}] shows one. The page's script
(static/model.js) calls the same /v1 predict route as any client, with the API key the user
types, and draws the answer with textContent. Off with MCSERVE_PAGES=false.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, HTMLResponse, Response

from service.api.common.call import state
from service.api.common.html import MAX_SHOWN, render
from service.api.pages import evaluations
from service.engine.model import ServedModel
from service.engine.params import default_interval
from service.errors import ModelNotFoundError

router = APIRouter(tags=["pages"])
HTML_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such model, version or plot", "content": {"text/html": {}}},
    503: {"description": "the model is not ready", "content": {"text/html": {}}},
}
Name = Annotated[str, Path(description="model name")]
Version = Annotated[str, Path(description="model version")]
MAX_FORM_FIELDS = 256  # more features than this: no form, the page points to the API
IMAGE_CELLS = 32 * 32  # the largest drawing grid
NOT_CLINICAL = "not for clinical use"
F = TypeVar("F", bound=Callable[..., Any])


def page(path: str, **kwargs: Any) -> Callable[[F], F]:
    """A GET route (HEAD is answered as GET by the front door, service/api/front.py)."""

    def add(endpoint: F) -> F:
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        return endpoint

    return add


def _ranges(spec: Any, field: str, n: int) -> list[tuple[float, float] | None]:
    given = getattr(spec, field)
    if given:
        return [tuple(r) for r in given]
    if field == "valid_ranges" and spec.value_range:
        return [tuple(spec.value_range)] * n
    return [None] * n


def _finite(v: float) -> bool:
    return abs(v) < 1e300  # False for inf and NaN too


def _default(train: tuple[float, float] | None, valid: tuple[float, float] | None) -> str:
    """Start each field in the middle of what the model saw in training (or may be given); of a
    range open at one end, at its finite end (0 was outside a valid range of 100 and up)."""
    ranges = [r for r in (train, valid) if r is not None]
    for r in ranges:
        if _finite(r[0]) and _finite(r[1]):
            return f"{(r[0] + r[1]) / 2:.6g}"
    for r in ranges:
        for end in r:
            if _finite(end):  # whole: rounded, an end could fall outside its range
                text = repr(float(end))
                return text.removesuffix(".0")
    return "0"


def form_of(model: ServedModel, body_bytes: int = 8 << 20) -> dict[str, Any]:
    """What the "try it" form asks for: a field per feature (tabular), a drawing grid (an
    image of one channel: a shape [1, H, W], or [H, W] without feature names), a text box (a
    text model), a WAV file (an audio model; at most what the model and `body_bytes` take), or
    nothing when none fits. A named [H, W] is
    fields (a [2, 4] input of two visits' measurements was drawn as a grid, its names and
    ranges gone). Unnamed features are
    called "element j", as the API's messages call them."""
    spec = model.manifest.inputs
    if spec.text is not None:  # a text model: one text box
        t = spec.text
        return {"kind": "text", "max_tokens": t.max_tokens, "truncation": t.truncation,
                "max_bytes": t.max_text_bytes}  # fmt: skip
    if spec.audio is not None:  # an audio model: one WAV file
        a = spec.audio
        # The page sends the file in base64, a third larger, in a body of at most body_bytes.
        most = min(a.max_audio_bytes, (body_bytes - 256) * 3 // 4)
        return {"kind": "audio", "sample_rate": a.sample_rate, "seconds": f"{a.seconds:g}",
                "truncation": a.truncation, "max_bytes": most,
                "resample": a.resample}  # fmt: skip
    n = spec.features
    shape = list(spec.shape)
    # A drawing: one channel of at least 2 x 2 cells ([1, H, W], as the digits' [1, 8, 8] with
    # its px0..px63, or an unnamed [H, W]) whose features all share one valid range and one
    # training range and have no units: a [1, 3, 4] of named measurements, each with its own ranges,
    # was drawn as a grid of one range, and a [1, 3] row as a 1 x 3 grid.
    grid = (
        len(shape) >= 2
        and all(d == 1 for d in shape[:-2])
        and min(shape[-2:]) > 1
        and (len(shape) >= 3 or spec.feature_names is None)
    )
    # One range for every pixel (what a 0-1 image's training_ranges are) is still an image.
    varied = (
        len({tuple(r) for r in spec.training_ranges or []}) > 1
        or any(spec.units or [])
        or len({tuple(r) for r in spec.valid_ranges or []}) > 1
    )
    image = grid and not varied and n <= IMAGE_CELLS
    if not image and n > MAX_FORM_FIELDS:  # checked before building anything n long
        return {"kind": "none"}
    valid, train = _ranges(spec, "valid_ranges", n), _ranges(spec, "training_ranges", n)
    if image:
        lo, hi = valid[0] or (0.0, 1.0)
        return {"kind": "image", "rows": shape[-2], "cols": shape[-1], "low": lo, "high": hi}
    names = spec.feature_names or [f"element {j}" for j in range(n)]
    units = spec.units or [None] * n
    fields = [
        {
            "index": j,
            "name": names[j],
            # What the page's script matches in the API's messages, which quote a name whole:
            # its first MAX_SHOWN characters (a longer name is shown cut) and its length as
            # JavaScript counts it (UTF-16 code units: an emoji is two).
            "key": names[j][:MAX_SHOWN],
            "length": len(names[j].encode("utf-16-le", "surrogatepass")) // 2,
            "unit": units[j] or "",
            "valid": valid[j],
            "train": train[j],
            "value": _default(train[j], valid[j]),
        }
        for j in range(n)
    ]
    return {"kind": "tabular", "fields": fields}


def _flat(d: dict[str, Any]) -> list[tuple[str, str]]:
    """A dict as (key, text) rows: nested values as compact JSON (escaped by the template)."""
    return [
        (str(k), v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in d.items()
    ]


async def served(
    request: Request, name: str, version: str | None
) -> tuple[ServedModel, evaluations.Evaluation | None]:
    """The model and its evaluation (None: none found for its digest). ModelNotFound and
    NotReady go to errors.py, which answers a page route with an HTML page. The report is
    looked for on a worker thread: a first read of a large one is not done on the event loop."""
    st = state(request)
    model = st.registry.get(name, version)
    entry = next((e for e in st.registry.versions(name) if e.model is model), None)
    if entry is None:  # unloaded between the two look-ups
        raise ModelNotFoundError(f"model '{name}' was unloaded; GET /models lists the models")
    where = st.settings.evaluation_dir
    found = await run_in_threadpool(evaluations.find, entry.path, model.name, model.digest, where)
    return model, found


async def card(request: Request, name: str, version: str | None) -> dict[str, Any]:
    st = state(request)
    model, evaluation = await served(request, name, version)
    m = model.manifest
    entries = st.registry.versions(name)
    base = f"/models/{m.name}/versions/{m.version}"
    policy = model.calibrator.policy
    return {
        "m": m,
        "interval": default_interval(m),  # as /v1/models/{name} says: a classifier's is quantile
        "digest": model.digest,
        "versions": [(e.version, e.ready) for e in entries],
        "not_clinical": NOT_CLINICAL in m.intended_use.lower(),
        "provenance": _flat(m.training.provenance),
        "metrics": _flat(m.training.metrics),
        "calibration": model.calibrator.metadata(),
        "referral": _flat({k: v for k, v in policy.model_dump().items() if v is not None}),
        "evaluation": evaluation,
        "plots": [(f"{base}/plots/{p}.png", evaluations.PLOTS[p]) for p in evaluation.plots]
        if evaluation
        else [],
        "form": form_of(model, st.settings.max_body_bytes),
        # The classes in order, for the page's script to draw an answer's in: each label's
        # first MAX_SHOWN characters (no page holds a longer string) and that length.
        "label_keys": [label[:MAX_SHOWN] for label in m.outputs.labels or []],
        "key_chars": MAX_SHOWN,
        "predict_url": f"/v1/models/{m.name}/versions/{m.version}:predict",
        "shape": json.dumps(list(m.inputs.shape)),
        "keys_required": bool(st.settings.api_keys),
        "max_samples": st.settings.max_samples,
    }


@page("/models", response_class=HTMLResponse, summary="Model pages: the list")
async def list_page(request: Request) -> Response:
    by_name: dict[str, list[Any]] = {}
    for e in state(request).registry.entries():
        by_name.setdefault(e.name, []).append(e)
    rows = []
    for name, es in sorted(by_name.items()):
        ready = [e for e in es if e.ready]
        m = ready[-1].model.manifest if ready else None
        rows.append(
            {
                "name": name,
                "task": m.task if m else "not ready",
                # Why it is not ready as /v1 says it, without the server's paths.
                "use": m.intended_use if m else (state(request).registry.reason(es[-1]) or ""),
                "versions": [(e.version, e.ready) for e in es],
            }
        )
    return render("models.html", models=rows)


@page(
    "/models/{name}",
    response_class=HTMLResponse,
    responses=HTML_ERRORS,
    summary="Model page: the card and a form to try the newest ready version",
)
async def model_page(name: Name, request: Request) -> Response:
    return render("model.html", **await card(request, name, None))


@page(
    "/models/{name}/versions/{version}",
    response_class=HTMLResponse,
    responses=HTML_ERRORS,
    summary="Model page of one version",
)
async def version_page(name: Name, version: Version, request: Request) -> Response:
    return render("model.html", **await card(request, name, version))


@page(
    "/models/{name}/versions/{version}/plots/{plot}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **HTML_ERRORS},
    summary="An evaluation plot of one version",
)
async def plot(name: Name, version: Version, plot: str, request: Request) -> Response:
    _, ev = await served(request, name, version)
    path = ev.plot_path(plot) if ev else None
    if path is None:
        raise ModelNotFoundError(f"model '{name}' version '{version}' has no plot '{plot}'")
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type="image/png", headers=headers)
