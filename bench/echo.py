"""The HTTP ceiling of the machine: the same request model parsed, a fixed small JSON returned.

Run under the same uvicorn settings as the service, with no middleware:
    python -m bench.echo --port 8001 [--raw]

`--raw`: the same work as a bare ASGI app (no FastAPI), for the floor of uvicorn itself.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response

from service.api.native.schemas import PredictRequest

app = FastAPI()
FIXED = b'{"predictions":[{"label":"benign","probabilities":{"malignant":0.1,"benign":0.9}}]}'


@app.post("/v1/models/{name}:predict")
async def predict(name: str, body: PredictRequest) -> Response:
    return Response(FIXED, media_type="application/json")


@app.get("/readyz")
async def ready() -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same work without FastAPI: read the body, parse the request model, answer FIXED."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] != "/readyz":
        PredictRequest.model_validate_json(body)
    length = str(len(FIXED)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FIXED})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--raw", action="store_true", help="a bare ASGI app instead of FastAPI")
    args = ap.parse_args()
    uvicorn.run(
        raw if args.raw else app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
