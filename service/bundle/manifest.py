"""The bundle manifest: a versioned pydantic model written as `manifest.json`.

Evolution rules: every schema version this code knows is accepted and upgraded in memory; a newer
version is refused with a clear error. Optional sections (calibration, clinical, referral,
backend) default to absent, so a bundle written before a section existed stays valid. A bundle
version is immutable: changing anything means writing a new version directory. The `inputs`
and `outputs` sections, what the model takes and gives, are spec.py.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from service.bundle.calibration import Calibration, ReferralPolicy
from service.bundle.document import check_document
from service.bundle.spec import InputSpec, OutputSpec, Strict
from service.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
Task = Literal["classification", "regression"]
Variance = Literal["log_variance", "softplus_std"]


class Aleatoric(Strict):
    """Regression noise: none, 1/tau from training (homoscedastic), or learned per input
    (heteroscedastic): the model then outputs each target's mean followed by each target's
    variance parameter, read as ``parameterisation`` says (service/engine/heads.py):
    ``log_variance`` s^2 = exp(v), ``softplus_std`` s = log(1 + exp(v))."""

    kind: Literal["none", "homoscedastic", "heteroscedastic"] = "none"
    noise_var: float = Field(default=0.0, ge=0.0)
    parameterisation: Variance | None = None  # heteroscedastic only

    @model_validator(mode="after")
    def _kind(self) -> Aleatoric:
        learned = self.kind == "heteroscedastic"
        if learned != (self.parameterisation is not None):
            raise ValueError(
                "aleatoric.parameterisation ('log_variance' or 'softplus_std') is required for, "
                "and only for, kind 'heteroscedastic'"
            )
        if learned and self.noise_var:
            raise ValueError("a heteroscedastic model learns its noise: leave noise_var at 0")
        # kind 'none' with a noise_var was served as a fixed noise: the manifest said both
        if (self.kind == "homoscedastic") != (self.noise_var > 0):
            raise ValueError(
                "aleatoric.noise_var > 0 is required for, and only for, kind 'homoscedastic' "
                f"(got kind {self.kind!r}, noise_var {self.noise_var!r})"
            )
        return self


class Defaults(Strict):
    # At most the masks' pass counter allows (engine/masks.py MAX_PASSES - 1, as the server's
    # max_samples): a default of 10**15 loaded ready and every default request was refused.
    samples: int = Field(default=100, ge=2, le=(1 << 20) - 1)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    interval: Literal["gaussian", "quantile", "conformal"] = "gaussian"


class LastSites(Strict):
    """Sample only the last k dropout sites (graph order); the earlier ones act as in eval mode."""

    last: int = Field(ge=1)


DropoutSites = Literal["all"] | LastSites


class MCSettings(Strict):
    """How MC passes run. `dropout_sites`: every site (the default), or only the last k in the
    graph's order, the earlier ones then part of the deterministic prefix that runs once per
    input; requests may choose another setting within 1..len(dropout) (`dropout_sites`)."""

    dropout_sites: DropoutSites = "all"

    @field_validator("dropout_sites", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        """One message for every wrong shape (a union's first error would say "should be
        'all'" to a {"last": 0})."""
        last = v.get("last") if isinstance(v, dict) and set(v) == {"last"} else None
        if v == "all" or isinstance(v, LastSites) or (type(last) is int and last >= 1):
            return v
        raise ValueError(f"use 'all' or {{'last': k}} with an integer k >= 1, got {v!r}")


class DropoutLayout(Strict):
    """One dropout site, in graph order: its name, rate and mask shape per row (batch left out).

    `shared_over: "time"` (variational dropout, docs/BUNDLES.md): one mask per sequence, shared
    by every time step; the site's input is batch-first [B, L, *features] and its mask_shape is
    [1, *features]. Absent: a mask per element (or per channel), as before."""

    name: str
    p: float
    mask_shape: list[int]
    shared_over: Literal["time"] | None = None

    @model_validator(mode="after")
    def _time_axis(self) -> DropoutLayout:
        shape = self.mask_shape
        if self.shared_over is not None and (len(shape) < 2 or shape[0] != 1):
            found = "no time axis" if len(shape) < 2 else f"a time axis of {shape[0]}, not 1"
            raise ValueError(
                f"dropout site '{self.name}': shared_over 'time' needs a tensor with a time "
                f"axis, [B, L, *features], whose mask_shape is [1, *features]; mask_shape "
                f"{shape} has {found}. Remove shared_over (a mask per element) or declare it "
                "on a site whose input is a sequence"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("shared_over") is None:  # manifests without variational sites keep their bytes
            out.pop("shared_over", None)
        return out


class Artifact(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    role: Literal[
        "architecture", "weights", "onnx", "pt2", "calibration", "data", "tokenizer", "words"
    ]


class Training(Strict):
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    row_fingerprints: dict[str, list[str]] = Field(default_factory=dict)


class Manifest(Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    task: Task
    intended_use: str
    inputs: InputSpec
    outputs: OutputSpec
    aleatoric: Aleatoric = Aleatoric()
    defaults: Defaults = Defaults()
    dropout: list[DropoutLayout]
    artifacts: dict[str, Artifact]
    training: Training = Training()
    created_by: str = "mcserve"
    # Optional sections added by later capabilities; absent means "not configured".
    calibration: Calibration | None = None
    referral: ReferralPolicy | None = None
    clinical: dict[str, Any] | None = None
    backend: dict[str, Any] | None = None
    mc: MCSettings | None = None  # absent: every dropout site sampled

    @property
    def sampled_sites(self) -> int | None:
        """The default number of last sites sampled; None: all of them."""
        sites = self.mc.dropout_sites if self.mc is not None else "all"
        if isinstance(sites, LastSites) and sites.last < len(self.dropout):
            return sites.last
        return None

    @model_validator(mode="after")
    def _task_outputs(self) -> Manifest:
        if self.task == "classification" and not self.outputs.labels:
            raise ValueError("a classification manifest needs outputs.labels")
        out = self.outputs
        if self.task == "regression" and bool(out.target) == bool(out.targets):
            raise ValueError(
                "a regression manifest needs outputs.target (one target) or outputs.targets "
                "(two or more), not both"
            )
        if out.targets is not None:
            names = out.target_names
            if len(names) < 2 or len(set(names)) != len(names) or out.unit is not None:
                raise ValueError(
                    "outputs.targets lists two or more distinct targets, each with its own unit "
                    "(outputs.unit is for a single target)"
                )
        if self.task == "classification" and self.aleatoric.kind != "none":
            raise ValueError("aleatoric noise is for regression; a classifier has kind 'none'")
        if self.calibration is not None:
            classifier = self.task == "classification"
            want = "one-minus-probability" if classifier else "abs-residual-over-std"
            if self.calibration.score != want:
                raise ValueError(f"a {self.task} calibration uses the score {want!r}")
            scale = self.calibration.class_scale
            if scale is not None and len(scale) != len(out.labels or []):
                raise ValueError(
                    f"calibration.class_scale and class_bias have {len(scale)} values but the "
                    f"model has {len(out.labels or [])} classes (outputs.labels); give one per "
                    "class, in outputs.labels order"
                )
            per_target = self.calibration.target_scores
            if (per_target is not None or out.targets is not None) and (
                sorted(per_target or {}) != sorted(out.target_names)
            ):
                raise ValueError(
                    "a multi-output calibration holds calibration.target_scores for exactly the "
                    f"targets {out.target_names}"
                )
        sites = self.mc.dropout_sites if self.mc is not None else "all"
        if isinstance(sites, LastSites) and sites.last > len(self.dropout):
            raise ValueError(
                f"mc.dropout_sites asks for the last {sites.last} dropout sites but the model "
                f"has {len(self.dropout)}; use 'all' or {{'last': k}} with 1 <= k <= "
                f"{len(self.dropout)}"
            )
        text = self.inputs.text
        if (
            self.referral is not None
            and self.referral.unfamiliar_words is not None
            and (text is None or text.words is None)
        ):
            raise ValueError(
                "referral.unfamiliar_words needs a text model with a word list "
                "(inputs.text.words); this model has none"
            )
        if self.referral is not None and self.referral.targets is not None:
            unknown = sorted(set(self.referral.targets) - set(out.target_names))
            if unknown or out.targets is None:
                raise ValueError(
                    f"referral.targets is for a multi-output regressor's targets "
                    f"{out.target_names}; unknown: {unknown}"
                )
        return self

    def dumps(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse, refusing newer schema versions before validation so the message is the useful one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge numbers
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{where}: the manifest must be a JSON object")
    version = data.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: manifest schema version {version} is newer than this mcserve supports "
            f"(up to {SCHEMA_VERSION}); upgrade mcserve to load this bundle"
        )
    check_document(data, where)  # depth and non-finite numbers, free-form sections included
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        hint = ""
        if first["type"] == "finite_number":
            hint = " (Infinity and NaN are not numbers a manifest may hold)"
        if first["type"] == "extra_forbidden":  # fields are added without a schema bump
            hint = (
                " (a field this mcserve does not know: a newer mcserve may have written this "
                "bundle; upgrade mcserve, or serve a version of the model without the field)"
            )
        raise BundleError(f"{where}: invalid manifest at '{loc}': {first['msg']}{hint}") from exc
