"""Request-body bytes the server holds for the requests in flight, capped server-wide.

`max_body_bytes` bounds one request and `max_concurrency` how many run at once, but not their
product: 64 clients each sending a 6 MB WAV file (an 8 MB base64 body) took the server to
1.8 GiB and its compute process to 0.6 GiB, over the deployment's 2 Gi memory limit, so the
kubelet would kill the pod and every request in it. Here the bytes are counted as they arrive
(not as declared: a Content-Length of 8 MB followed by nothing would take the budget for free)
and again when a compressed body is inflated; a request whose declared length does not fit
when its body is first read, or whose next bytes would pass `max_inflight_body_bytes`, is
answered 429 with Retry-After (503 on CDS Hooks), naming the
setting, and what it held is given back. Every byte taken is given back when its request ends,
however it ends. One event loop takes and gives, so no lock is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import OverloadedError

RETRY_AFTER_S = 1.0  # a body in flight is answered in about a second at the bundled models' rates


class BodiesOverBudget(OverloadedError):
    """Raised by a request's `receive` (or the inflation) past the server's budget: answered as
    any error, shaped by route family (errors.py)."""


@dataclass
class BodyBudget:
    limit: int
    held: int = 0
    refused: int = 0  # requests answered BodiesOverBudget, for the metrics

    def check(self, n: int) -> None:
        """Raise BodiesOverBudget if `n` more bytes would not fit now (nothing taken)."""
        if self.held + n > self.limit:
            self.refused += 1
            raise BodiesOverBudget(
                f"the server holds {self.held} bytes of request bodies in flight and this "
                f"request's would pass its limit ({self.limit} bytes, setting "
                "max_inflight_body_bytes); retry after Retry-After seconds, on another replica, "
                "or send smaller requests",
                RETRY_AFTER_S,
            )

    def take(self, n: int) -> None:
        """Hold `n` more bytes, or raise BodiesOverBudget (nothing taken)."""
        self.check(n)
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n
