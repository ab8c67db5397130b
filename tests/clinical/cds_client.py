"""The EHR as a CDS client: its signing keys and the JWTs it sends."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

ISS = "https://ehr.example.org/cds-client"
BASE = "https://mcserve.example.org"  # public_base_url: what the EHR calls


@dataclass
class Signer:
    """An EHR's signing key: `token(aud)` makes a fresh, valid client JWT."""

    key: Any
    alg: str
    kid: str
    iss: str = ISS

    def public_jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        jwk: dict[str, Any] = algo.to_jwk(self.key.public_key(), as_dict=True)
        return jwk | {"kid": self.kid, "alg": self.alg, "use": "sig"}

    def claims(self, aud: str, now: float | None = None, **extra: Any) -> dict[str, Any]:
        t = time.time() if now is None else now
        return {
            "iss": self.iss,
            "aud": aud,
            "exp": int(t) + 300,
            "iat": int(t),
            "jti": str(uuid.uuid4()),
        } | extra

    def token(
        self,
        aud: str,
        now: float | None = None,
        headers: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        return jwt.encode(
            self.claims(aud, now, **extra),
            self.key,
            algorithm=self.alg,
            headers={"kid": self.kid, "typ": "JWT"} | (headers or {}),
        )


def auth(signer: Signer, path: str, **extra: Any) -> dict[str, str]:
    """The Authorization header for a call to `path` (aud = the public URL of the path)."""
    return {"Authorization": f"Bearer {signer.token(BASE + path, **extra)}"}
