"""The CDS client JWT checklist: each way a token can be wrong, and its outcome."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cds_client import BASE, ISS, Signer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.clinical.trust import (
    ReplayCache,
    TokenRejected,
    TokenVerifier,
    TrustConfigError,
    bearer,
    load_keys,
)

AUD = "https://mcserve.example.org/cds-services/diabetes-progression"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT built by hand (what PyJWT refuses to make: alg none, HMAC over a public key)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
def clock() -> list[float]:
    return [NOW]


@pytest.fixture
def verifier(jwks: dict[str, Any], clock: list[float]) -> TokenVerifier:
    return TokenVerifier(
        {ISS: load_keys(ISS, jwks, None)}, leeway_s=30, max_lifetime_s=600, clock=lambda: clock[0]
    )


@pytest.mark.parametrize("which", ["es384", "rs384"])
def test_valid_tokens_are_accepted(
    which: str, request: pytest.FixtureRequest, verifier: TokenVerifier
) -> None:
    signer: Signer = request.getfixturevalue(which)
    claims = verifier.verify(signer.token(AUD, NOW, tenant="hospital-a"), [AUD])
    assert claims.iss == ISS and claims.tenant == "hospital-a" and claims.jti


def test_every_allowed_algorithm_family(clock: list[float]) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signers = [
        Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", "a"),
        Signer(ec.generate_private_key(ec.SECP521R1()), "ES512", "b"),
        Signer(rsa_key, "RS256", "c"),
        Signer(rsa_key, "RS512", "d"),
        Signer(rsa_key, "PS256", "e"),
        Signer(rsa_key, "PS384", "f"),
    ]
    keys = load_keys(ISS, {"keys": [s.public_jwk() for s in signers]}, None)
    v = TokenVerifier({ISS: keys}, clock=lambda: clock[0])
    for s in signers:
        assert v.verify(s.token(AUD, NOW), [AUD]).iss == ISS, s.alg


def test_expired(es384: Signer, verifier: TokenVerifier, clock: list[float]) -> None:
    token = es384.token(AUD, NOW)  # exp = NOW + 300
    clock[0] = NOW + 300 + 29  # within the leeway
    verifier.verify(token, [AUD])
    clock[0] = NOW + 300 + 31
    with pytest.raises(TokenRejected, match="expired"):
        verifier.verify(es384.token(AUD, NOW), [AUD])


def test_issued_in_the_future_or_living_too_long(es384: Signer, verifier: TokenVerifier) -> None:
    with pytest.raises(TokenRejected, match="future"):
        verifier.verify(es384.token(AUD, NOW + 120), [AUD])
    with pytest.raises(TokenRejected, match="lifetime"):
        verifier.verify(es384.token(AUD, NOW, exp=int(NOW) + 3600), [AUD])
    with pytest.raises(TokenRejected, match="nbf"):
        verifier.verify(es384.token(AUD, NOW, nbf=int(NOW) + 120), [AUD])


@pytest.mark.parametrize(
    "claims",
    [{"exp": float("nan")}, {"iat": float("nan")}, {"exp": float("inf"), "iat": float("nan")},
     {"nbf": float("nan")}, {"exp": float("inf")}, {"exp": 10**400}, {"iat": 10**400}],
)  # fmt: skip
def test_a_time_claim_that_is_not_finite_is_refused(
    claims: dict[str, float], es384: Signer, verifier: TokenVerifier
) -> None:
    """NaN compares false with everything: an `exp` of NaN never expired and was replayable."""
    token = es384.token(AUD, NOW, **claims)
    with pytest.raises(TokenRejected, match="is not a finite number"):
        verifier.verify(token, [AUD])


def test_wrong_audience(es384: Signer, verifier: TokenVerifier) -> None:
    with pytest.raises(TokenRejected, match=r"[Aa]udience"):
        verifier.verify(es384.token(AUD + "-other", NOW), [AUD])
    with pytest.raises(TokenRejected, match=r"[Aa]udience"):
        verifier.verify(es384.token("http://internal:8000/cds-services/x", NOW), [AUD])


def test_unknown_issuer(es384: Signer, verifier: TokenVerifier) -> None:
    with pytest.raises(TokenRejected, match="not trusted"):
        verifier.verify(es384.token(AUD, NOW, iss="https://evil.example"), [AUD])


def test_replayed_jti(es384: Signer, verifier: TokenVerifier, clock: list[float]) -> None:
    token = es384.token(AUD, NOW)
    verifier.verify(token, [AUD])
    clock[0] = NOW + 60
    with pytest.raises(TokenRejected, match="replayed"):
        verifier.verify(token, [AUD])
    # The same jti in a new token is a replay too.
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    with pytest.raises(TokenRejected, match="replayed"):
        verifier.verify(es384.token(AUD, NOW + 60, jti=jti), [AUD])


def test_alg_none(es384: Signer, verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        token = handmade({"alg": alg, "typ": "JWT"}, es384.claims(AUD, NOW))
        with pytest.raises(TokenRejected, match="not allowed"):
            verifier.verify(token, [AUD])


def test_hmac_is_refused_even_keyed_with_the_public_key(
    es384: Signer, verifier: TokenVerifier
) -> None:
    pem = es384.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384)):
        for secret in (pem, b"shared-secret"):
            token = handmade(
                {"alg": alg, "typ": "JWT", "kid": es384.kid},
                es384.claims(AUD, NOW),
                lambda data, s=secret, d=digest: hmac.new(s, data, d).digest(),
            )
            with pytest.raises(TokenRejected, match="not allowed"):
                verifier.verify(token, [AUD])


def test_wrong_key(verifier: TokenVerifier, es384: Signer) -> None:
    impostor = Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", es384.kid)
    with pytest.raises(TokenRejected, match="signature"):
        verifier.verify(impostor.token(AUD, NOW), [AUD])
    without_kid = handmade({"alg": "ES384", "typ": "JWT"}, impostor.claims(AUD, NOW))
    with pytest.raises(TokenRejected):
        verifier.verify(without_kid, [AUD])


def test_kid_is_required(es384: Signer, verifier: TokenVerifier) -> None:
    # Signed by the issuer's genuine key, but naming none: CDS Hooks requires `kid`.
    token = jwt.encode(es384.claims(AUD, NOW), es384.key, algorithm="ES384")
    assert "kid" not in jwt.get_unverified_header(token)
    with pytest.raises(TokenRejected, match="no kid"):
        verifier.verify(token, [AUD])


def test_key_of_another_type_or_algorithm(es384: Signer, verifier: TokenVerifier) -> None:
    # An ES384 token naming the RSA key's kid: no key fits, refused before any verification.
    with pytest.raises(TokenRejected, match="no ES384 key"):
        verifier.verify(es384.token(AUD, NOW, headers={"kid": "ehr-rs384"}), [AUD])
    # An ES256 token under a kid whose JWK says ES384.
    p256 = Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", es384.kid)
    with pytest.raises(TokenRejected, match="no ES256 key"):
        verifier.verify(p256.token(AUD, NOW), [AUD])


@pytest.mark.parametrize("missing", ["jti", "exp", "iat", "aud", "iss"])
def test_required_claims(missing: str, es384: Signer, verifier: TokenVerifier) -> None:
    claims = es384.claims(AUD, NOW)
    del claims[missing]
    token = jwt.encode(claims, es384.key, algorithm="ES384", headers={"kid": es384.kid})
    with pytest.raises(TokenRejected):
        verifier.verify(token, [AUD])


def test_typ_and_malformed(es384: Signer, verifier: TokenVerifier) -> None:
    with pytest.raises(TokenRejected, match="typ"):
        verifier.verify(es384.token(AUD, NOW, headers={"typ": "at+jwt"}), [AUD])
    for junk in ("", "abc", "a.b.c", "a.b"):
        with pytest.raises(TokenRejected, match="malformed"):
            verifier.verify(junk, [AUD])


def test_replay_cache_is_bounded_and_forgets_expired_ids() -> None:
    cache = ReplayCache(capacity=2)
    cache.add((ISS, "a"), until=100.0, now=0.0)
    cache.add((ISS, "b"), until=200.0, now=0.0)
    with pytest.raises(TokenRejected, match="full"):
        cache.add((ISS, "c"), until=300.0, now=50.0)  # never forget an unexpired id
    cache.add((ISS, "c"), until=300.0, now=150.0)  # "a" expired and is purged
    assert len(cache) == 2
    with pytest.raises(TokenRejected, match="replayed"):
        cache.add((ISS, "c"), until=300.0, now=160.0)
    cache.add((ISS, "a"), until=400.0, now=250.0)  # "b" expired; "a" is a new token's id now
    assert len(cache) == 2


def test_keys_configuration(tmp_path: Path, es384: Signer) -> None:
    public = {"keys": [es384.public_jwk()]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(public))
    assert len(load_keys(ISS, None, path)) == 1
    with pytest.raises(TrustConfigError, match="exactly one"):
        load_keys(ISS, public, path)
    with pytest.raises(TrustConfigError, match="kty"):
        load_keys(ISS, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, None)
    private = jwt.get_algorithm_by_name("ES384").to_jwk(es384.key, as_dict=True)
    with pytest.raises(TrustConfigError, match="private"):
        load_keys(ISS, {"keys": [private]}, None)
    with pytest.raises(TrustConfigError, match="no keys"):
        load_keys(ISS, {"keys": []}, None)
    nameless = {k: v for k, v in es384.public_jwk().items() if k != "kid"}
    with pytest.raises(TrustConfigError, match="no kid"):
        load_keys(ISS, {"keys": [nameless]}, None)
    with pytest.raises(TrustConfigError, match="cannot read"):
        load_keys(ISS, None, tmp_path / "absent.json")


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None


ODD_HEADERS = [
    {"alg": ["ES384"], "typ": "JWT", "kid": "ehr-es384"},
    {"alg": {"a": 1}, "typ": "JWT", "kid": "ehr-es384"},
    {"alg": "ES384", "typ": ["JWT"], "kid": "ehr-es384"},
    {"alg": "ES384", "typ": "JWT", "kid": "ehr-es384", "jku": {"u": 1}},
    {"alg": "ES384", "typ": "JWT", "kid": "ehr-es384", "jku": ["https://x.example"]},
]


@pytest.mark.parametrize("header", ODD_HEADERS)
def test_header_fields_of_another_json_type_are_refused(
    header: dict[str, Any], es384: Signer, verifier: TokenVerifier
) -> None:
    # A list or object where a string belongs raised TypeError (an unauthenticated 500).
    token = handmade(header, es384.claims(AUD, NOW), lambda data: b"sig")
    with pytest.raises(TokenRejected):
        verifier.verify(token, [AUD])
    assert verifier.key_urls(token)[2] == []  # nothing fetched for it either


async def test_header_fields_of_another_json_type_are_a_bare_401(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    path = "/cds-services/diabetes-progression"
    for header in ODD_HEADERS:
        token = handmade(header, es384.claims(BASE + path), lambda data: b"sig")
        r = await ehr.post(path, content=b"{}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and r.content == b"", header


def test_a_jwks_key_whose_alg_is_not_a_string_is_a_configuration_error(es384: Signer) -> None:
    for alg in (["ES384"], {"a": 1}):
        with pytest.raises(TrustConfigError, match="has alg"):
            load_keys(ISS, {"keys": [es384.public_jwk() | {"alg": alg}]}, None)
