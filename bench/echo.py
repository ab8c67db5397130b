"""The HTTP ceiling of the machine: the same request model parsed, a fixed small JSON returned.

Run under the same uvicorn settings as the service, with no middleware:
    python -m bench.echo --port 8001
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response

from service.api.schemas import PredictRequest

app = FastAPI()
FIXED = b'{"predictions":[{"label":"benign","probabilities":{"malignant":0.1,"benign":0.9}}]}'


@app.post("/v1/models/{name}:predict")
async def predict(name: str, body: PredictRequest) -> Response:
    return Response(FIXED, media_type="application/json")


@app.get("/readyz")
async def ready() -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
