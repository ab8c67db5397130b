"""`train`'s flags read and checked before any file is: layer sizes, `--labels`, and flags that
belong to the other kind of data (a text flag for a tabular CSV and the reverse), which had been
ignored without a word."""

from __future__ import annotations

import csv
from collections.abc import Collection

from service.errors import InvalidInputError

# Flag -> the parameter's name in `train`; each applies to one kind of data only.
TEXT_ONLY = {
    "--arch": "arch",
    "--max-tokens": "max_tokens",
    "--word-vectors": "word_vectors",
    "--word-min-texts": "word_min_texts",
    "--splits": "splits",
}
TABLE_ONLY = {"--hidden": "hidden", "--noise": "noise", "--ignore": "ignore"}


def hidden_sizes(hidden: str) -> list[int]:
    """`--hidden 64,64` as layer sizes."""
    try:
        sizes = [int(h) for h in hidden.split(",") if h.strip()]
    except ValueError:
        raise InvalidInputError(
            f"--hidden {hidden!r}: give comma-separated integers, e.g. 64,64"
        ) from None
    if not sizes or min(sizes) < 1:
        raise InvalidInputError(f"--hidden {hidden!r}: give positive layer sizes, e.g. 64,64")
    return sizes


def class_labels(labels: str | None) -> list[str] | None:
    """`--labels` as a list, read as one CSV row: a label holding a comma is quoted, as in the
    data file (`--labels '"yes, severe",no'`); splitting at every comma had made it two."""
    if labels is None:
        return None
    try:
        given = [v.strip() for v in next(csv.reader([labels], skipinitialspace=True), [])]
    except csv.Error as exc:
        raise InvalidInputError(
            f"--labels {labels!r}: {exc}; quote a label that holds a comma, e.g. "
            "'\"yes, severe\",no'"
        ) from None
    if len(given) < 2 or "" in given:
        raise InvalidInputError(
            f"--labels {labels!r}: give two or more class labels, comma separated (quote a "
            "label that holds a comma: '\"yes, severe\",no')"
        )
    return given


def ignored_columns(ignore: str | None) -> list[str]:
    """`--ignore patient_id,date` as column names, read as one CSV row like `--labels`."""
    if ignore is None:
        return []
    try:
        names = [v.strip() for v in next(csv.reader([ignore], skipinitialspace=True), [])]
    except csv.Error as exc:
        raise InvalidInputError(f"--ignore {ignore!r}: {exc}") from None
    if not names or "" in names:
        raise InvalidInputError(
            f"--ignore {ignore!r}: give one or more column names, comma separated"
        )
    return names


def refuse_other_kind(given: Collection[str], *, text: str | None, data: str) -> None:
    """Refuse a flag given on the command line (`given`: the parameters' names, even at their
    default values: `--arch textcnn` on a table trained a tabular model without a word) that
    does not apply to the data: ``text`` is the text column trained on, or None for a tabular
    model."""
    flags = TABLE_ONLY if text is not None else TEXT_ONLY
    set_ = [f for f, p in flags.items() if p in given]
    if not set_:
        return
    verb = "is" if len(set_) == 1 else "are"
    if text is None:
        raise InvalidInputError(
            f"{', '.join(set_)} {verb} for text data, and {data} trains a tabular model (no "
            "column of free text: name one with --text-column); leave it out"
        )
    raise InvalidInputError(
        f"{', '.join(set_)} {verb} for tabular data, and {data} trains a text model on the "
        f"column {text!r}; leave it out"
    )
