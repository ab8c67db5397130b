"""The API documentation and the pages' assets, all served from the installed packages.

FastAPI's /docs and /redoc load Swagger UI and ReDoc from a public CDN and start them with an
inline script: on a network without internet access the page was blank, and the inline script
needs a looser CSP. Here the assets come from the pinned `fastapi-offline` package (its
static/ folder: Swagger UI, ReDoc and a favicon) and a small script of ours starts them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from service.api.common.html import DOCS_CSP, render
from service.api.pages import routes as pages
from service.settings import Settings

OWN = "/static/mcserve"  # service/api/static
VENDOR = "/static/vendor"  # fastapi_offline/static: swagger-ui-bundle.js, swagger-ui.css, ...


def vendor_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


class Assets(StaticFiles):
    """Static files with nosniff, like the pages: a browser takes each as its declared type."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install(app: FastAPI, settings: Settings) -> None:
    """Docs at /docs and /redoc, the assets under /static, the model pages unless switched off.
    Create the app with docs_url=None and redoc_url=None: these routes replace FastAPI's."""
    app.mount(OWN, Assets(packages=[("service.api", "static")]), name="mcserve-static")
    app.mount(VENDOR, Assets(directory=vendor_dir()), name="vendor-static")
    openapi = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def swagger_ui() -> Response:
        return render("swagger.html", csp=DOCS_CSP, title=app.title, openapi=openapi)

    @app.get("/redoc", include_in_schema=False, response_class=HTMLResponse)
    async def redoc() -> Response:
        return render("redoc.html", csp=DOCS_CSP, title=app.title, openapi=openapi)

    if settings.pages:
        app.include_router(pages.router)
