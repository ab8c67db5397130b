"""API keys: optional, stored as sha256 hashes, compared in constant time (pure ASGI middleware).

Keys guard /v1 and /v2 (health stays open) and, by setting, /metrics and the docs. A key may be
limited to some models (it may neither use nor list, load or unload the others); admin keys
alone may use the repository (load/unload) routes. CDS Hooks routes are never guarded by API
keys: they have their own JWT trust.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.common import errors
from service.errors import ForbiddenError, McServeError, UnauthorizedError
from service.settings import ApiKey

MODEL_PATH = re.compile(r"^/v[12]/models/([^/:]+)|^/v2/repository/models/([^/]+)")
OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/")
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")
CREDENTIALS = (b"authorization", b"x-api-key")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    status: int  # 0: allowed
    message: str = ""
    caller: str | None = None
    models: frozenset[str] | None = None  # the models the key may use; None: every model


def allowed_models(state: object) -> frozenset[str] | None:
    """The models a request's key may see (listings show only these); None: every model."""
    models: frozenset[str] | None = getattr(state, "models", None)
    return models


class ApiKeyGuard:
    def __init__(
        self,
        app: ASGIApp,
        keys: list[ApiKey],
        protect_metrics: bool = False,
        protect_docs: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.protect_docs = protect_docs
        # Built once: every request of a scoped key carries its scope to the listings.
        # (By object: two keys may share an id.)
        self._scopes = {id(k): frozenset(k.models) for k in keys if k.models is not None}

    def _guarded(self, path: str) -> bool:
        if path.startswith(OPEN_PATHS):
            return False
        if path.startswith(("/v1", "/v2")):
            return True
        if path == "/metrics":
            return self.protect_metrics
        return path.startswith(DOC_PATHS) and self.protect_docs

    def _find(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        found = None
        for key in self.keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def decide(self, path: str, headers: dict[bytes, bytes], repeated: bool = False) -> Decision:
        admin_route = path.startswith("/v2/repository")
        if not admin_route and (not self.keys or not self._guarded(path)):
            return Decision(0)
        if admin_route and not any(k.admin for k in self.keys):  # no key could ever do
            return Decision(
                403,
                "repository routes need an admin key, and none is configured: add one with "
                '"admin": true to MCSERVE_API_KEYS',
            )
        if repeated:  # a proxy reading the first and this the last would disagree on who calls
            return Decision(401, "send one Authorization header and at most one X-API-Key header")
        auth = headers.get(b"authorization", b"").decode("latin-1")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        presented = presented or headers.get(b"x-api-key", b"").decode("latin-1").strip()
        if not presented:
            return Decision(
                401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            )
        key = self._find(presented)
        if key is None:
            return Decision(401, "invalid API key")
        if admin_route and not key.admin:
            return Decision(
                403, f"API key '{key.id}' is not an admin key; repository routes need one", key.id
            )
        m = MODEL_PATH.match(path)
        name = m and (m.group(1) or m.group(2))
        if name and key.models is not None and name not in key.models:
            return Decision(403, f"API key '{key.id}' may not use model '{name}'", key.id)
        return Decision(0, caller=key.id, models=self._scopes.get(id(key)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not self.keys and not path.startswith("/v2/repository"):
            await self.app(scope, receive, send)  # nothing to check: no headers copied
            return
        raw = scope.get("headers") or []
        names = [k.lower() for k, _ in raw if k.lower() in CREDENTIALS]
        decision = self.decide(path, dict(raw), len(names) != len(set(names)))
        if decision.caller:
            state = scope.setdefault("state", {})
            state["caller"] = decision.caller
            if decision.models is not None:
                state["models"] = decision.models
        if decision.status == 0:
            await self.app(scope, receive, send)
            return
        refusal: McServeError = (
            UnauthorizedError(decision.message)
            if decision.status == 401
            else ForbiddenError(decision.message)
        )
        response = await errors.respond(Request(scope), refusal)  # 401 with WWW-Authenticate
        await response(scope, receive, send)
