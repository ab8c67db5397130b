"""Request and response models of the Open Inference Protocol (/v2), also its OpenAPI documentation.

The infer body is parsed by hand (it may carry binary tensors after the JSON), so `InferRequest`
is validated in `oip/infer.py` and declared in the OpenAPI document through
`common.fields.inline_schema`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from service.api.common.parameters import (
    AUTO_MAX,
    AUTO_SAMPLES,
    AUTO_TOLERANCE,
    MAX_SEED,
    Passes,
    Samples,
)

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
Dim = Annotated[int, Field(ge=0, strict=True)]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# MLServer's codecs add `content_type` to requests and inputs, and their `model_dump()` keeps
# `"headers": null`. "np" and "str" say what the data already are here; "base64" (encoded
# BYTES) and "pd" (a column per input) would be read as something else: refused.
ContentType = Literal["np", "str"]


class InputParameters(Closed):
    binary_data_size: int | None = Field(
        default=None, ge=0, strict=True, description="bytes of this input after the JSON header"
    )
    content_type: ContentType | None = Field(default=None, description="MLServer's; a hint")
    headers: None = Field(default=None, description="MLServer's, always null in a request")


class RequestInput(Closed):
    name: str
    shape: list[Dim] = Field(max_length=16, description="[batch, *input shape]")
    datatype: Datatype = Field(
        description="FP32 (FP64 and FP16 cast to FP32); INT64 or INT32 for token ids; BYTES: "
        "texts, or for audio models WAV files (base64 in JSON data, raw in the binary extension)"
    )
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(default=None, description="row-major, flat or nested")


class OutputParameters(Closed):
    binary_data: bool | None = Field(default=None, strict=True)


class RequestOutput(Closed):
    name: str
    parameters: OutputParameters | None = None


class InferParameters(Closed):
    """mcserve's own request parameters plus the keys tritonclient reserves."""

    samples: Samples | None = Field(default=None, description=AUTO_SAMPLES)
    max_samples: Passes | None = Field(default=None, description=AUTO_MAX)
    tolerance: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, strict=True, description=AUTO_TOLERANCE
    )
    confidence: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        strict=True,  # numbers in strings are refused, as in the inputs
        description="interval level; one level",
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, strict=True, description="replay a previous answer"
    )
    mode: Literal["mc", "deterministic"] = "mc"
    interval: Literal["gaussian", "quantile", "conformal"] | None = None
    dropout_sites: Literal["all"] | StrictInt | None = Field(
        default=None, description="'all' or k: the last k dropout sites; default: the model's"
    )
    timeout: int | None = Field(
        default=None,
        ge=1,
        le=2**63 - 1,  # tritonclient's int64; a 310-digit one overflowed a float (a 500)
        strict=True,
        description="deadline in microseconds (tritonclient)",
    )
    binary_data_output: bool | None = Field(
        default=None, strict=True, description="every output binary unless it says otherwise"
    )
    # Accepted and ignored: every request is independent and the queue is first in, first out.
    sequence_id: int | str | None = Field(default=None, description="ignored (stateless models)")
    sequence_start: bool | None = Field(default=None, description="ignored")
    sequence_end: bool | None = Field(default=None, description="ignored")
    priority: int | None = Field(default=None, ge=0, strict=True, description="ignored (FIFO)")
    content_type: ContentType | None = Field(default=None, description="MLServer's; a hint")
    headers: None = Field(default=None, description="MLServer's, always null in a request")


class InferRequest(Closed):
    id: str | None = None
    parameters: InferParameters = InferParameters()
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(default=None, min_length=1)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        """`"parameters": null` is no parameters: optional in the protocol, and what MLServer's
        InferenceRequest.model_dump() sends (it was a 400)."""
        return {} if v is None else v


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float | bool | None] | None = Field(
        default=None, description="row-major, flat; null: unbounded (a conformal interval)"
    )


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, str | int | float | bool] = {}
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = Field(
        default=None, description="dropout_sites: the default, the count and what may be asked"
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    error: str | None = None


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


class V2Error(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str
    request_id: str | None = None
