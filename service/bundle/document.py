"""The manifest as a JSON document, checked before its sections are validated.

Two things the typed sections' validation does not see in the free-form sections
(`training.provenance`, `calibration.data`, `clinical`, `backend`: any JSON): nesting depth, and
numbers that are not finite (Python's json reads `Infinity`, `NaN` and `1e999`). A provenance
nested 300 deep loaded, and then every `GET /v1/models/<name>` was a 500 (orjson refuses past
254 levels).
"""

from __future__ import annotations

import math
from typing import Any

from service.errors import BundleError

MAX_DEPTH = 32  # the typed sections nest 5 deep at most; a provenance record needs few more
# Sections of any JSON; the typed ones refuse non-finite numbers themselves (spec.Strict).
FREE_FORM = {("training", "provenance"), ("calibration", "data"), ("clinical",), ("backend",)}


def check_document(data: Any, where: str) -> None:
    """BundleError naming the section and path of the first value nested deeper than MAX_DEPTH,
    or of a number that is not finite in a free-form section."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:  # a stack, not recursion: the depth is the bundle's choice
        value, at = stack.pop()
        if len(at) > MAX_DEPTH:
            raise BundleError(
                f"{where}: section '{_dotted(at[:2])}' nests deeper than {MAX_DEPTH} levels (at "
                f"'{_dotted(at[:4])}...'); flatten it: free-form sections are records, not trees"
            )
        free = at[:1] in FREE_FORM or at[:2] in FREE_FORM
        if free and isinstance(value, float) and not math.isfinite(value):
            raise BundleError(
                f"{where}: '{_dotted(at)}' is {value}; a manifest's numbers are finite: write "
                "a finite value, or a string if it is a note"
            )
        if isinstance(value, dict):
            stack.extend((v, (*at, str(k)[:40])) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, (*at, str(i))) for i, v in reversed(list(enumerate(value))))


def _dotted(at: tuple[str, ...]) -> str:
    return ".".join(at)
