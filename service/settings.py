"""All configuration in one pydantic-settings object: environment prefix MCSERVE_, CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.bundle.load import TrustPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_dir: Path = Path("models")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")

    # Request limits.
    max_instances: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_samples: int = Field(default=1000, ge=2)

    # Batching and overload control.
    batching: bool = True
    max_batch_rows: int = Field(default=65536, ge=1, description="rows of one batch")
    forward_rows: int = Field(default=16384, ge=64, description="rows of one forward (chunk)")
    max_queue_rows: int = Field(default=2_000_000, ge=1)
    max_delay_ms: float = Field(default=0.0, ge=0.0)

    # Readiness: models that must be loaded (default: every bundle found).
    required_models: list[str] | None = None

    # Trust.
    allow_code_artifacts: bool = False
    max_artifact_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    pinned_digests: list[str] = Field(default_factory=list)

    # Shutdown: readiness fails at once, serve `drain_grace_s` more, then drain within timeout.
    drain_grace_s: float = Field(default=5.0, ge=0.0)
    drain_timeout_s: float = Field(default=20.0, ge=0.0)

    def trust_policy(self) -> TrustPolicy:
        return TrustPolicy(
            allow_code_artifacts=self.allow_code_artifacts,
            max_artifact_bytes=self.max_artifact_bytes,
            pinned_digests=frozenset(self.pinned_digests),
        )
