"""The one exception hierarchy of mcserve.

Every error a user can cause or meet derives from `McServeError`. Each class carries a stable
`code` that the HTTP layer maps to a status in one place (`service.api.common.errors`); the
engine and the bundle loader never know about HTTP. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any


class McServeError(Exception):
    """Base class: `message` is shown to clients, `details` adds structured context."""

    code = "internal"
    # Seconds after which asking again may succeed (answered as Retry-After); None: not said.
    retry_after_s: float | None = None

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidInputError(McServeError):
    """The request's data or parameters are wrong (shape, dtype, range, NaN, unknown key)."""

    code = "invalid_input"


class MethodNotAllowedError(McServeError):
    """A prediction route asked with another method than POST (answered with `Allow: POST`)."""

    code = "method_not_allowed"


class UnsupportedMediaTypeError(McServeError):
    """A body of a content type the route does not read."""

    code = "unsupported_media_type"


class PayloadTooLargeError(McServeError):
    """Too many instances, too many samples in one request, or too large a body."""

    code = "too_large"


class ModelNotFoundError(McServeError):
    """No model (or model version) of that name is loaded."""

    code = "not_found"


class ModelNotReadyError(McServeError):
    """The model exists but failed to load or is still loading."""

    code = "not_ready"


class BundleChangedError(ModelNotReadyError):
    """The compute process could not load a served version again: its files changed or went
    since the server read them (the server then refuses that version: lifecycle.py)."""


class OverloadedError(McServeError):
    """The queue cannot take the request now; `retry_after_s` estimates the drain time."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(McServeError):
    """The request's deadline passed: before its compute started (none was spent), or during
    it (the compute of its remaining passes was skipped). `what` says which; the message adds
    how a client gives itself more time, which a CDS route says its own way."""

    code = "deadline"
    HINT = (
        "allow more time (timeout_ms on /v1, timeout on /v2), send fewer instances or samples, "
        "or retry later"
    )
    QUEUED = "allow more time (timeout_ms on /v1, timeout on /v2) or retry later"  # no compute

    def __init__(self, what: str, hint: str = HINT) -> None:
        super().__init__(f"{what}; {hint}")
        self.what, self.hint = what, hint

    def __reduce__(self) -> tuple[Any, ...]:  # from the compute process: the parts, not the sum
        return (type(self), (self.what, self.hint))


class CancelledError(McServeError):
    """The client went away; its queued work was dropped."""

    code = "cancelled"


class ShuttingDownError(McServeError):
    """The server is draining and takes no new work."""

    code = "shutting_down"


# What a request still unanswered when the drain time is out is told (server.py, middleware.py).
DRAIN_OUT = (
    "the server is shutting down and its drain time (MCSERVE_DRAIN_TIMEOUT_S) ran out before "
    "this request was answered; retry on another replica"
)


class ComputeUnavailableError(McServeError):
    """The compute process died while it held the request (it is restarted at once)."""

    code = "compute_unavailable"
    retry_after_s = 1.0  # the worker's RESTART_PAUSE_S; a restart takes seconds more


class ComputeRestartingError(ComputeUnavailableError):
    """The compute process is being restarted (worker.py's recovery): a call waits for no
    start of its own; a model loaded meanwhile is loaded into the new process by the recovery."""


class ModelError(McServeError):
    """A model cannot be used as given (no dropout, functional dropout, unsupported layer)."""

    code = "model_error"


class BundleError(McServeError):
    """A bundle on disk is refused: bad hash, missing file, untrusted artifact, newer schema."""

    code = "bundle_error"


class ForbiddenError(McServeError):
    """The operation is not enabled or not allowed for this caller."""

    code = "forbidden"


class AuditUnavailableError(McServeError):
    """The prediction's audit record cannot be kept (queue full, store down): fail closed."""

    code = "audit_unavailable"


class MissingDataError(McServeError):
    """Data a clinical service needs is missing, too old or in an unknown unit (CDS Hooks 412).

    `details` holds one FHIR OperationOutcome issue per problem (`code`, `diagnostics`,
    `expression`), so the client sees everything that is missing at once.
    """

    code = "missing_data"


class UnauthorizedError(McServeError):
    """A CDS client's JWT was refused. The reason is logged, never sent: the answer is bare."""

    code = "unauthorized"


class ReplayCheckUnavailableError(McServeError):
    """A CDS token could not be checked for reuse: the memory replicas share is unreachable.
    Refused (fail closed) as a 503, not as a bad token: the client's login is not at fault.
    `retry_after_s`: when this replica may check again (its pause after a failure)."""

    code = "replay_check_unavailable"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownCardError(McServeError):
    """Feedback names a card this replica did not issue, or has forgotten (bounded memory)."""

    code = "not_found"


def json_hint(problem: str) -> str:
    """What to do about a body the JSON parser refused (`problem`: its message), in words the
    parser's own ("unexpected end of hex escape", "expected value at line 1 column 1") lack."""
    if "hex escape" in problem:  # what the parser says of \ud800 without its pair
        return (
            " (a \\ud800-\\udfff escape must be one half of a surrogate pair; a lone one is not "
            "Unicode: send the text as UTF-8, or escape whole characters)"
        )
    if "unicode" in problem.lower() or "utf-8" in problem.lower():
        return " (send the body as UTF-8)"
    return " (the body must be valid JSON)"


def without_bom(body: bytes) -> bytes:
    """A JSON body without a UTF-8 byte-order mark, which RFC 8259 lets a parser ignore (some
    Windows tools write one; the parser said "expected value at line 1 column 1")."""
    return body[3:] if body.startswith(b"\xef\xbb\xbf") else body


NAME_CHARS = 64  # an error shows this much of a name the client chose (a key): enough to find it


def shown_name(name: object) -> str:
    """A client's key or field name as an error shows it: whole when short, else its start and
    length (a 3 MB key was echoed twice into a 6 MB answer and once into the access log)."""
    text = str(name)
    if len(text) <= NAME_CHARS:
        return text
    return f"{text[:NAME_CHARS]}... ({len(text)} characters)"
