"""Trusting CDS clients: the JWT checks of the CDS Hooks specification, with PyJWT.

A token is accepted only when all hold (any failure is one `TokenRejected`, answered as a bare
401; the reason goes to the log with `iss`, `kid` and `jti`, never the token):
1. the header's `alg` is asymmetric (ES256/384/512, RS256/384/512, PS256/384/512): `none` and
   HMAC are refused before any key is looked at, so no algorithm confusion is possible;
   `typ` is `JWT`;
2. `kid` is present (CDS Hooks requires it), `iss` is on the allowlist, and the signature
   verifies with that issuer's public key named by `kid` (whose type fits; a key's own `alg`,
   when given, must equal the header's). Keys come from configuration, and from the issuer's
   allow-listed `jku` URLs (`jwks.py`); a `jku` header off that list is refused, never fetched;
3. `aud` is the URL called (one of `audiences`: the configured public base URL plus the path,
   never taken from the request's Host or X-Forwarded-* headers); `exp`, `iat`, `jti` present;
   not expired, not issued in the future, `exp - iat` within the maximum lifetime, `nbf`
   passed (each with a leeway for clock skew);
4. `jti` was not seen before from that issuer. Seen ids are kept in memory, per replica, until
   their token expires (bounded; when full of unexpired ids, new tokens are refused rather than
   an id forgotten). Several replicas do not share this memory: a replayed token could succeed
   once per replica within its lifetime; keep lifetimes short (the specification asks <= 5 min).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK

log = logging.getLogger("mcserve.cds.trust")

ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
KEY_TYPES = {"ES": "EC", "RS": "RSA", "PS": "RSA"}


class TokenRejected(Exception):
    """Why a token was refused (for the log only)."""


class TrustConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    jwk: PyJWK
    kty: str  # "EC" or "RSA"
    kid: str | None
    alg: str | None  # the key's own `alg`, when its JWK names one


@dataclass(frozen=True)
class Claims:
    iss: str
    jti: str
    tenant: str | None = None
    sub: str | None = None
    until: float = 0.0  # wall-clock time until which the jti must be remembered (exp + leeway)


def load_keys(iss: str, jwks: Mapping[str, Any] | None, jwks_file: Path | None) -> list[Key]:
    """The public keys of one issuer, from a JWKS given inline or in a file."""
    if (jwks is None) == (jwks_file is None):
        raise TrustConfigError(f"CDS issuer {iss!r}: give exactly one of jwks and jwks_file")
    if jwks_file is not None:
        try:
            jwks = json.loads(jwks_file.read_text())
        except (OSError, ValueError) as exc:
            raise TrustConfigError(f"CDS issuer {iss!r}: cannot read {jwks_file}: {exc}") from exc
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise TrustConfigError(f"CDS issuer {iss!r}: the JWKS has no keys")
    out = []
    for i, k in enumerate(keys):
        kty = k.get("kty") if isinstance(k, dict) else None
        if kty not in ("EC", "RSA"):
            raise TrustConfigError(
                f"CDS issuer {iss!r}: key {i} has kty {kty!r}; only EC and RSA public keys"
            )
        if "d" in k:
            raise TrustConfigError(
                f"CDS issuer {iss!r}: key {i} is a private key; give public keys"
            )
        if not isinstance(k.get("kid"), str) or not k["kid"]:
            raise TrustConfigError(
                f"CDS issuer {iss!r}: key {i} has no kid; give each key the kid its tokens name"
            )
        alg = k.get("alg")
        # A list or object is unhashable: `in ALGORITHMS` would raise TypeError, not refuse it.
        if alg is not None and (not isinstance(alg, str) or alg not in ALGORITHMS):
            raise TrustConfigError(f"CDS issuer {iss!r}: key {i} has alg {alg!r}")
        try:
            jwk = PyJWK.from_dict(k)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError) as exc:
            raise TrustConfigError(f"CDS issuer {iss!r}: key {i}: {exc}") from exc
        out.append(Key(jwk, kty, k.get("kid"), k.get("alg")))
    return out


class ReplayCache:
    """Seen (issuer, jti) pairs until their expiry time (wall clock seconds), bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _purge(self, now: float) -> None:
        for key in [k for k, until in self._seen.items() if until < now]:
            del self._seen[key]

    def add(self, key: tuple[str, str], until: float, now: float) -> None:
        """Remember `key` until `until`; TokenRejected when seen before or when full."""
        seen = self._seen.get(key)
        if seen is not None and seen >= now:
            raise TokenRejected("jti replayed")
        if len(self._seen) >= self.capacity:
            self._purge(now)
            if len(self._seen) >= self.capacity:
                raise TokenRejected("replay cache full of unexpired token ids")
        self._seen[key] = until


def _number(claims: Mapping[str, Any], name: str) -> float:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TokenRejected(f"claim {name} is not a number")
    # PyJWT's JSON reads NaN and Infinity: NaN fails every comparison, so an `exp` of NaN never
    # expired, was remembered "until nan" and could be replayed without end.
    try:
        seconds = float(v)  # an int past float's range (10**400) overflows: a 500 before
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise TokenRejected(f"claim {name} is not a finite number of seconds")
    return seconds


class TokenVerifier:
    def __init__(
        self,
        issuers: Mapping[str, Sequence[Key]],
        *,
        jku: Mapping[str, Sequence[str]] | None = None,
        leeway_s: float = 30.0,
        max_lifetime_s: float = 3600.0,
        replay_capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuers = {iss: list(keys) for iss, keys in issuers.items()}
        self.jku = {iss: list(urls) for iss, urls in (jku or {}).items()}
        self.leeway = leeway_s
        self.max_lifetime = max_lifetime_s
        self.replay = ReplayCache(replay_capacity)
        self.clock = clock

    def key_urls(self, token: str) -> tuple[str, str, list[str]]:
        """(iss, kid, the JWKS URLs to consult) for a token whose kid no configured key has:
        its `jku` header when allow-listed, else every URL of its issuer. Nothing for a token
        that `verify` will refuse anyway (malformed, unknown issuer, a `jku` off the list)."""
        try:
            header = jwt.get_unverified_header(token)
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError:
            return "", "", []
        kid, jku = header.get("kid"), header.get("jku")
        if not isinstance(iss, str) or not isinstance(kid, str) or not kid:
            return "", "", []
        urls = self.jku.get(iss, [])
        if not urls:
            return "", "", []
        if any(k.kid == kid for k in self.issuers.get(iss, [])):
            return iss, kid, []  # a configured key: nothing to fetch
        if jku is not None:
            urls = [jku] if jku in urls else []
        return iss, kid, urls

    def verify(self, token: str, audiences: Sequence[str], fetched: Sequence[Key] = ()) -> Claims:
        """The token's claims, or TokenRejected; `fetched`: keys from the issuer's JWKS URLs."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed token: {exc}") from None
        alg = header.get("alg")
        # Header fields are the client's JSON: a list or object must be refused like any other
        # bad value (`[...] in ALGORITHMS` raised TypeError, an unauthenticated 500).
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise TokenRejected(f"algorithm {str(alg)[:50]!r} is not allowed")
        if str(header.get("typ", "")).upper() != "JWT":
            raise TokenRejected(f"typ {header.get('typ')!r} is not JWT")
        iss = unverified.get("iss")
        keys = self.issuers.get(iss) if isinstance(iss, str) else None
        if keys is None or not isinstance(iss, str):
            raise TokenRejected(f"issuer {iss!r} is not trusted")
        jku = header.get("jku")
        if jku is not None and jku not in self.jku.get(iss, []):
            raise TokenRejected(f"jku {str(jku)[:200]!r} is not on issuer {iss!r}'s list")
        keys = [*keys, *fetched]
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the header has no kid (CDS Hooks requires one)")
        candidates = [
            k
            for k in keys
            if k.kid == kid and k.kty == KEY_TYPES[alg[:2]] and (k.alg is None or k.alg == alg)
        ]
        if not candidates:
            raise TokenRejected(f"issuer {iss!r} has no {alg} key with kid {kid!r}")
        claims = self._decode(token, candidates, alg, iss, audiences)
        now = self.clock()
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if now > exp + self.leeway:
            raise TokenRejected("token expired")
        if iat > now + self.leeway:
            raise TokenRejected("token issued in the future")
        if exp - iat > self.max_lifetime:
            raise TokenRejected(f"token lifetime {exp - iat:.0f} s is over {self.max_lifetime} s")
        if "nbf" in claims and _number(claims, "nbf") > now + self.leeway:
            raise TokenRejected("token not valid yet (nbf)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise TokenRejected("jti must be a non-empty string")
        # Last: only authentic tokens may take room in the replay memory.
        self.replay.add((iss, jti), exp + self.leeway, now)
        tenant = claims.get("tenant")
        sub = claims.get("sub")
        return Claims(
            iss=iss,
            jti=jti,
            tenant=tenant if isinstance(tenant, str) else None,
            sub=sub if isinstance(sub, str) else None,
            until=exp + self.leeway,
        )

    def _decode(
        self, token: str, keys: list[Key], alg: str, iss: str, audiences: Sequence[str]
    ) -> dict[str, Any]:
        last: Exception | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key.jwk.key,
                    algorithms=[alg],
                    audience=list(audiences),
                    issuer=iss,
                    options={
                        "require": ["iss", "aud", "exp", "iat", "jti"],
                        # Times are checked by the caller against the injectable clock.
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                    },
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc  # try the issuer's next key
            except (jwt.PyJWTError, TypeError, ValueError) as exc:
                raise TokenRejected(f"{type(exc).__name__}: {exc}") from None
        raise TokenRejected(f"signature does not verify ({last})")


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    return token or None
