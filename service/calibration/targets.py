"""Values of a CSV as numbers and class labels, read alike by `train`, `calibrate` and
`evaluate`.

- Values are stripped: " 2" is "2".
- Numbers must be finite and within float32's range (|v| <= 3.4e38): the served model computes
  in float32, so a larger value could only come back as infinity or garbage.
- Numeric class labels are equal by value, exactly: "1", "1.0" and "01" are one class (`key`);
  a label is numeric when written in ASCII decimal ("1e3" yes, "1_000" or "١" no), and compared
  as a Decimal, so 17-digit codes stay distinct.
- A classification target that is empty, a number that is not finite ("nan", "NaN", "inf"), a
  missing-value marker ("NA", "N/A", "#N/A", "NULL", "<NA>", "#NULL!", any case, or "?", "-",
  "--", ".", as UCI files, spreadsheets and statistics packages write it) or a spreadsheet's
  error ("#DIV/0!") is a missing value, not a class: refused with its row, unless the class
  list names it exactly (`train --labels NA,...` or a bundle whose labels hold it), since some
  data sets do call a class "NA".
- A number (a feature; a regression target) is read by `read_number` in all three commands:
  the same refusals, and "36,9" is told it holds a decimal comma.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal

import numpy as np

from service.engine.inputs import LARGEST
from service.errors import InvalidInputError

FLOAT32_MAX = LARGEST["float32"]  # what a served float input holds (engine/inputs.py)
# "-", "--" and "." are how spreadsheets, SPSS and SAS write a missing value: "-" was a class.
NA_MARKERS = frozenset({"na", "n/a", "#n/a", "null", "<na>", "?", "-", "--", ".", "#null!"})
# A spreadsheet's formula that failed (#DIV/0!, #VALUE!, #REF!, #NAME?, #NUM!): not a value.
SPREADSHEET_ERROR = re.compile(r"#[A-Za-z0-9/]+[!?]")
# "36,9": a decimal comma, a European spreadsheet's (the file quoted it, as it held a comma).
DECIMAL_COMMA = re.compile(r"[+-]?[0-9]+,[0-9]+")


# A label is a number when written in ASCII decimal: float() also reads "1_000", Arabic-Indic
# and full-width digits, and float64 made 17-digit codes one class and "1e-400" equal to "0".
DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def number(v: str) -> Decimal | None:
    """``v`` as an exact number when it is written as a decimal number, else None."""
    return Decimal(v) if DECIMAL.fullmatch(v) else None


def key(label: str) -> Decimal | str:
    """What makes two labels one class: the value of a number, else the text in Unicode's
    composed form (NFC: "è" typed as one character or as e and a combining accent is one
    label; compatibility forms such as "x²" and "x2" stay apart)."""
    n = number(label)
    return n if n is not None else unicodedata.normalize("NFC", label)


def missing(v: str) -> str | None:
    """Why the stripped value ``v`` is a missing value rather than a class (or None)."""
    if not v:
        return "the value is empty"
    if v.lower() in NA_MARKERS:
        return f"{v!r} marks a missing value"
    if SPREADSHEET_ERROR.fullmatch(v):
        return f"{v!r} is a spreadsheet's error (a formula that failed), not a value"
    try:
        f = float(v)
    except ValueError:
        return None
    return None if math.isfinite(f) else f"{v!r} is not a finite number"


def read_number(v: str, where: str, advice: str = "") -> float:
    """The stripped ``v`` as a float64 float32 can hold, written in ASCII decimal (float() also
    took "1_234.5" and other scripts' digits); ``where`` (e.g. "f.csv: data row 3 (line 4),
    column 'y'") names it in the error, ``advice`` is the fix for a value that is no number."""
    if not v:
        raise InvalidInputError(f"{where}: the value is empty; fill it in or drop the row")
    why = missing(v)
    if why is not None:
        fill = "fill the value in" if "finite" in why else "fill it in"
        raise InvalidInputError(
            f"{where}: {why}; {fill} or drop the row (the model takes no missing values)"
        )
    if not DECIMAL.fullmatch(v):
        if DECIMAL_COMMA.fullmatch(v):
            advice = f"; a decimal comma? write {v.replace(',', '.')} (a point, no quotes)"
        raise InvalidInputError(f"{where}: {v!r} is not a number{advice}")
    f = float(v)
    if abs(f) > FLOAT32_MAX:
        raise InvalidInputError(
            f"{where}: {v!r} is beyond float32's range (|value| <= 3.4e38), in which the model "
            "computes; rescale the column (other units)"
        )
    return f


def class_indices(
    values: Sequence[str], labels: Sequence[str], where: Callable[[int], str]
) -> np.ndarray:
    """Each value's index into a bundle's ``labels``: the label itself, a number equal by value
    to a numeric label ("2.0" is label "2"), or, only when no label is a number (so that no
    value can mean both), a class index 0..K-1. ``where(i)`` names row i in an error."""
    exact = {lab: k for k, lab in enumerate(labels)}
    # A label written in another Unicode form ("è" decomposed) is the label (`key`).
    composed = {key(lab): k for k, lab in enumerate(labels) if number(lab) is None}
    by_value: dict[Decimal, list[int]] = {}
    for k, lab in enumerate(labels):
        n = number(lab)
        if n is not None:
            by_value.setdefault(n, []).append(k)
    indices = not by_value
    out = np.empty(len(values), dtype=np.int64)
    for i, raw in enumerate(values):
        v = raw.strip()
        if v in exact or key(v) in composed:
            out[i] = exact[v] if v in exact else composed[key(v)]
            continue
        n = number(v)
        if n is not None and n in by_value:
            ks = by_value[n]
            if len(ks) > 1:
                raise InvalidInputError(
                    f"{where(i)}: the target {v!r} equals the labels "
                    f"{[labels[k] for k in ks]} by value; write one of them exactly"
                )
            out[i] = ks[0]
            continue
        # Bounds first: int() of "1e999999999" would build a billion-digit integer.
        if indices and n is not None and 0 <= n < len(labels) and n == n.to_integral_value():
            out[i] = int(n)
            continue
        why = missing(v)
        if why is not None:
            raise InvalidInputError(
                f"{where(i)}, the target: {why} (a missing value, not a class); fill it in "
                "or drop the row"
            )
        also = f" or a class index 0..{len(labels) - 1}" if indices else ""
        raise InvalidInputError(
            f"{where(i)}: unknown label {v!r}; give one of the model's labels {list(labels)}{also}"
        )
    return out


def index_note(values: Sequence[str], labels: Sequence[str]) -> str | None:
    """The mapping said when targets were read as class indices (no label is a number and some
    value is): a file coding 1 = alive for the labels ['alive', 'dead'] was scored inverted
    without a word (review CSV)."""
    if any(number(lab) is not None for lab in labels):
        return None
    if not any(number(v.strip()) is not None for v in values):
        return None
    mapping = ", ".join(f"{k} = {lab!r}" for k, lab in enumerate(labels))
    return (
        f"the targets were read as class indices in the model's label order ({mapping}); if "
        "the file numbers its classes otherwise, write the labels themselves"
    )
