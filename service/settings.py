"""All configuration in one pydantic-settings object: environment prefix MCSERVE_, CLI overrides."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiKey(BaseModel):
    """One client key: `sha256` is the hex digest of the key (the key itself is never stored)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[str] | None = None  # None: every model
    admin: bool = False  # may load and unload models


class CdsIssuer(BaseModel):
    """A trusted CDS client (EHR): its public keys, as a JWKS inline or in a file, and/or the
    URLs its key sets are published at (`jku`, fetched and refreshed: keys that rotate)."""

    model_config = ConfigDict(extra="forbid")

    jwks: dict[str, Any] | None = None  # {"keys": [...]}: public keys only
    jwks_file: Path | None = None
    jku: list[str] = Field(default_factory=list)  # allow-listed JWKS URLs (https)
    # FHIR servers (base URLs) of this EHR that the service may fetch missing data from, with
    # the call's fhirAuthorization token; empty: never fetch (service/clinical/fetch.py).
    fhir_servers: list[str] = Field(default_factory=list)

    @field_validator("jku", "fhir_servers")
    @classmethod
    def _https(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
            if not parts.hostname or not (
                parts.scheme == "https" or (parts.scheme == "http" and loopback)
            ):
                raise ValueError(f"{url!r} must be an https URL (http only on loopback)")
        return v


# Said at start-up when CDS clients are authenticated but the URL they call is not configured.
PUBLIC_BASE_URL_REQUIRED = (
    "CDS issuers are configured (MCSERVE_CDS_ISSUERS) but MCSERVE_PUBLIC_BASE_URL is not set: "
    "set it to the base URL the EHR calls, e.g. MCSERVE_PUBLIC_BASE_URL=https://cds.hospital.org "
    "(a token's `aud` must be it plus /cds-services/<id>; the request's Host header is never "
    "trusted for this)"
)


class Settings(BaseSettings):
    # extra="ignore": other MCSERVE_* variables are warned about by name (settings_check.py).
    # allow_inf_nan=False: an infinite delay or timeout hung requests or shutdown.
    model_config = SettingsConfigDict(env_prefix="MCSERVE_", extra="ignore", allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_dir: Path = Path("models")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")

    # Request limits.
    max_instances: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Body bytes all requests in flight may hold together, wire and inflated (api/common/
    # inflight.py): past it a request is a 429. At least twice max_body_bytes (settings_check);
    # None: 128 MiB, or twice max_body_bytes where that is more (`inflight_body_limit`).
    max_inflight_body_bytes: int | None = Field(default=None, ge=2048)
    max_samples: int = Field(default=1000, ge=2, le=(1 << 20) - 1)  # the masks' pass counter
    # The deadline of a /v1 or /v2 request that sets none (timeout_ms, timeout): it bounds the
    # queue and the compute (a long request otherwise holds the compute, its batch's and every
    # later one's, for as long as it takes). None: no deadline by default.
    request_timeout_ms: float | None = Field(default=None, gt=0.0)

    # Batching and overload control.
    batching: bool = True
    max_batch_rows: int = Field(default=65536, ge=1, description="rows of one batch")
    # A text model on the CPU also caps a forward at budgets.TOKEN_BUDGET tokens (8,192): its
    # rows per forward are min(forward_rows, max(64, 8,192 // tokens per text)).
    forward_rows: int = Field(default=16384, ge=64, description="rows of one forward (chunk)")
    # CPU: dropout masks made and applied by a numba kernel (service/engine/fused.py), the same
    # numbers as torch ops. Off saves numba's memory (about 166 MiB RSS, 52 MiB of it private)
    # and 0.9 s of start-up; the engine is then about 1.5x slower (bench.engine).
    fused_masks: bool = True
    # Compute in a child process (service/engine/worker.py): on a thread, the compute waited for
    # the GIL behind the event loop and the two took turns on one core (about 1.5x fewer
    # requests/s at concurrency 64 on 2 cores). Off: one process, one model copy less.
    compute_process: bool = True
    # With the compute process: a child that holds calls and has sent nothing, not even its
    # heartbeat (4 a second, from a thread of its own), for this long is hung (stopped, or
    # holding the GIL): killed and restarted, its requests 503. 0: never; else at least 1 s.
    compute_stall_s: float = Field(default=60.0, ge=0.0, le=3600.0)
    # ... and one computing a batch whose forward count (its heartbeat carries it) has not moved
    # for this long is stuck (its main thread waits for ever with the GIL released). Longer
    # than any one forward, ONNX run or summary may take. 0: never; else at least 1 s.
    compute_stuck_s: float = Field(default=600.0, ge=0.0, le=86400.0)

    @field_validator("compute_stall_s", "compute_stuck_s")
    @classmethod
    def _stall(cls, v: float, info: ValidationInfo) -> float:
        if 0 < v < 1.0:  # a few heartbeats must fit in it
            raise ValueError(f"{info.field_name} is 0 (never) or at least 1 second")
        return v

    # With the compute process: the rows of one batch of the pipeline (up to 4 in flight; a
    # single larger request goes whole, or in turns: turn_ms). See service/engine/batcher.py.
    slice_rows: int = Field(default=1600, ge=1)
    # A request whose passes take longer is computed in turns of about this long, so the ones
    # behind it wait for one turn, not for all of it (service/engine/turns.py); 0: whole.
    turn_ms: float = Field(default=1000.0, ge=0.0, le=3_600_000.0)
    max_queue_rows: int = Field(default=2_000_000, ge=1)
    # Upper bounds on times: a delay or interval of years is a typo that hangs requests or
    # polling, never a setting (a finite 1e12 passed where infinity was refused).
    max_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)

    # Readiness: models that must be loaded (default: every bundle found).
    required_models: list[str] | None = None

    # Trust: what bundles may hold (service.bundle.load.TrustPolicy.from_settings).
    allow_code_artifacts: bool = False
    max_artifact_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_bundle_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)  # all artifacts together
    pinned_digests: list[str] = Field(default_factory=list)
    max_manifest_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_input_elements: int = Field(default=1 << 22, ge=1, description="values in one instance")

    # Referral policy per model name, on top of the manifest's `referral` section, e.g.
    # MCSERVE_REFERRAL='{"diabetes": {"epistemic": 30, "extrapolation": false}}'.
    referral: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # Shutdown: readiness fails at once, serve `drain_grace_s` more, then drain within timeout.
    drain_grace_s: float = Field(default=5.0, ge=0.0, le=3600.0)
    # > 0: uvicorn reads 0 as no limit (a drain that always ends in the kubelet's SIGKILL).
    drain_timeout_s: float = Field(default=20.0, gt=0.0, le=3600.0)

    # Operations: API keys (hashes only), what they guard, CORS, model control, logs.
    api_keys: list[ApiKey] = Field(default_factory=list)
    protect_metrics: bool = False
    protect_docs: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    model_control: Literal["none", "poll", "explicit"] = "none"
    poll_interval_s: float = Field(default=10.0, gt=0.0, le=86_400.0)
    log_format: Literal["json", "text"] = "json"

    # Audit trail (docs/AUDIT.md): every prediction recorded, append-only, replayable. Off by
    # default: where clinical records live is the deployer's decision (see docs/AUDIT.md).
    audit: bool = False
    audit_path: Path = Path("audit.db")  # SQLite (WAL) when audit_url is empty
    audit_url: str | None = None  # postgresql://user:password@host:5432/db, for several replicas
    audit_inputs: Literal["store", "hmac"] = "store"  # hmac: keep only a keyed digest of inputs
    audit_hmac_key: SecretStr | None = None
    audit_fail_open: bool = False  # True: answer even when the record cannot be queued
    audit_queue_size: int = Field(default=10_000, ge=1)
    # And in bytes (a text model's record is its token ids; one request may hold many).
    audit_queue_bytes: int = Field(default=256 * 2**20, ge=1)
    audit_batch_size: int = Field(default=256, ge=1)
    audit_flush_timeout_s: float = Field(default=30.0, ge=0.0)

    # Clinical decision support: CDS Hooks at /cds-services with FHIR output (docs/CLINICAL.md).
    cds_mapping_dir: Path | None = (
        None  # clinical mappings <model>.json; None: <model_dir>/clinical
    )
    cds_issuers: dict[str, CdsIssuer] = Field(default_factory=dict)  # allowlisted JWT `iss`
    cds_require_jwt: bool = True  # False: no client authentication (development only)
    # The URL clients call (JWT `aud`), e.g. behind an ingress; required with cds_issuers.
    public_base_url: str | None = None
    cds_jwt_leeway_s: float = Field(default=30.0, ge=0.0)  # clock skew allowed on exp/iat/nbf
    cds_jwt_max_lifetime_s: float = Field(default=3600.0, gt=0.0)  # exp - iat at most
    cds_jti_capacity: int = Field(default=100_000, ge=1)  # seen token ids kept per replica
    cds_card_capacity: int = Field(default=10_000, ge=1)  # issued card uuids kept for feedback
    cds_max_observation_age_days: float | None = Field(default=None, gt=0.0)  # overrides mappings
    cds_timeout_ms: float = Field(default=5000.0, gt=0.0)  # deadline of one hook call's compute
    fhir_version: Literal["R4B", "R5"] = "R4B"  # FHIR resources in cards and the native API

    # Connections (service/connections.py), against clients that open connections and send
    # little or nothing: a request head must arrive within header_timeout_s and its body within
    # body_timeout_s (else 408, closed); at most max_pending_connections wait for a head and
    # max_connections are open (None: the open-file limit less 128), a new one over either
    # closing the longest waiting; over max_concurrency connections or requests, 503.
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_pending_connections: int = Field(default=256, ge=1)
    max_connections: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=1000, ge=1)
    # Proxies whose X-Forwarded-For/-Proto headers are believed (IPs or CIDR ranges, "*": any).
    # Empty: none. uvicorn's own default trusts 127.0.0.1, so any local process could claim
    # another client address or scheme.
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    # CDS calls whose data are missing, too old or unusable: "card", a 200 with an info card
    # naming them (clinicians see it); "412", the OperationOutcome alone (CDS Hooks 2.0).
    cds_missing_data: Literal["card", "412"] = "card"
    # Fetching from an issuer's fhir_servers: one deadline for a call's searches, bytes per answer,
    # pages per search (a search stops once it holds the results its template asks for).
    cds_fhir_timeout_s: float = Field(default=3.0, gt=0.0)
    cds_fhir_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    cds_fhir_max_pages: int = Field(default=5, ge=1, le=100)
    # Model pages (service/api/pages/): HTML at /models, and where `evaluate` reports are read
    # (<evaluation_dir>/<name>/report.json, used only when its digest is the served bundle's).
    pages: bool = True
    evaluation_dir: Path | None = Path("docs/evaluation")

    # Prometheus `_created` samples beside counters and histograms (off: half the series).
    metrics_created: bool = False

    @field_validator("public_base_url")
    @classmethod
    def _absolute_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.query + parts.fragment
        ):
            raise ValueError(
                f"{v!r} is not an absolute http(s) URL without query or fragment; "
                "give the base URL clients call, e.g. https://cds.hospital.org"
            )
        return v

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address, a CIDR range or '*'; give the proxies' "
                    """addresses, e.g. MCSERVE_FORWARDED_ALLOW_IPS='["10.0.0.0/8"]'"""
                ) from None
        return v

    @model_validator(mode="after")
    def _cds_audience(self) -> Settings:
        # Without it `aud` would have to come from the request (Host, X-Forwarded-*), which the
        # client chooses: a token issued for another service would pass.
        if self.cds_require_jwt and self.cds_issuers and self.public_base_url is None:
            raise ValueError(PUBLIC_BASE_URL_REQUIRED)
        return self

    @property
    def inflight_body_limit(self) -> int:
        """The budget of body bytes in flight: the setting, else 128 MiB or twice the body
        limit where that is more (a deployment that raised max_body_bytes alone still starts)."""
        if self.max_inflight_body_bytes is not None:
            return self.max_inflight_body_bytes
        return max(128 * 1024 * 1024, 2 * self.max_body_bytes)
