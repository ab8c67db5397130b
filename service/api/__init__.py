"""HTTP adapters over the engine. Imports point down this list:

app.py      create_app: lifespan (models, workers, audit), routers, middleware
front.py    the one ASGI entry: our middleware once, the prediction endpoints called
            directly, everything else through FastAPI's router
native/     /v1: models, metadata, :predict (predict.py reads the request)
oip/        /v2, the Open Inference Protocol (infer.py reads the request; binary tensors,
            output tensors, the repository extension)
cds/        /cds-services, CDS Hooks with FHIR (clients.py: JWT trust and client state)
pages/      /models HTML pages, /docs and /redoc
common/     what every adapter shares: the engine call (call.py), prediction parameters,
            request fields, errors (the one place they become HTTP), middleware, API keys,
            app state, model lifecycle, audit hooks, HTML rendering, OpenAPI examples
"""
