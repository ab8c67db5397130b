"""A CSV file as `train`, `calibrate` and `evaluate` all read it: one reader for the three.

The bytes are decoded as UTF-8 (a byte-order mark dropped, as spreadsheets write it) and parsed
by `csv.reader` over the whole text, so quoted fields may hold commas, newlines and any Unicode
line separator. Blank lines are skipped, and so are rows of empty fields at the end of the file
(a spreadsheet's ",,,"). Every problem is an `InvalidInputError` naming the file
and the line or data row, with what to change: another encoding, a line the parser refuses (a
quote left open, text after a closing quote), a
header with an unnamed or repeated column, a row with more or fewer fields than the header.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidInputError

# csv's default field limit (131,072 characters) refused a long text with a traceback. Texts
# above 100,000 bytes are refused by a text model anyway (TextInput.max_text_bytes), so 1 Mi
# characters is room enough, and still bounds what an unclosed quote can swallow.
FIELD_LIMIT = 1 << 20
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
DELIMITERS = (";", "\t", "|")  # what a one-column header may really be split by


@dataclass(frozen=True)
class CsvFile:
    path: Path
    raw: bytes  # the file's bytes (its hash is the data's identity in a manifest)
    header: list[str]  # stripped names, each non-empty and distinct
    rows: list[list[str]]  # the data rows, each with as many fields as the header
    lines: list[int]  # each data row's first line in the file (1-based)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def where(self, i: int) -> str:
        """Data row ``i`` (0-based) in words: 'data row 3 (line 4)', header excluded."""
        return f"data row {i + 1} (line {self.lines[i]})"

    def locate(self, i: int) -> str:
        """'<path>: data row 3 (line 4)'."""
        return f"{self.path}: {self.where(i)}"

    def instances_as_rows(self, message: str, rows: Sequence[int] | None = None) -> str:
        """A request check's message about "instance i" (0-based) said of data row i, or of
        data row ``rows[i]`` when the instances were those rows (e.g. `train`'s calibration
        rows)."""
        return re.sub(
            r"\binstance (\d+)\b",
            lambda m: self.where(int(m[1]) if rows is None else int(rows[int(m[1])])),
            message,
        )

    def column(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [r[j] for r in self.rows]


def delimiter_hint(header: list[str]) -> str:
    """'; the file seems to use ';' ...' when a one-column header looks split by another
    delimiter than ',' (a European spreadsheet's ';', with decimal commas), else ''."""
    seps = [d for d in DELIMITERS if len(header) == 1 and d in header[0]]
    if not seps:
        return ""
    return (
        f"; the file seems to use {seps[0]!r} as its delimiter: save it with ',' between the "
        "values (comma-separated) and '.' as the decimal point (a spreadsheet set to another "
        "language writes ';' and decimal commas)"
    )


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(_UTF16_BOMS):
        raise InvalidInputError(
            f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark); save "
            "it as UTF-8 (a spreadsheet's 'CSV UTF-8')"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInputError(
            f"{path}: line {line} is not UTF-8 ({exc.reason} at byte {exc.start}); save the "
            "file as UTF-8 (a spreadsheet's 'CSV UTF-8')"
        ) from None


def _parse(path: Path, text: str) -> tuple[list[list[str]], list[int]]:
    rows: list[list[str]] = []
    lines: list[int] = []
    # strict: an unclosed quote is an error, not the rest of the file (or the rows up to the
    # next quote) read into one field, rows silently swallowed into a label (review CSV).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    old = csv.field_size_limit(FIELD_LIMIT)
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if "field larger than field limit" in str(exc):
                    raise InvalidInputError(
                        f"{path}: the row starting at line {start} has a field over "
                        f"{FIELD_LIMIT:,} characters (an unclosed quote makes the rest of the "
                        "file one field); close the quote or shorten the field"
                    ) from None
                if reader.line_num > start:  # the row ran on over lines: a quote left open
                    raise InvalidInputError(
                        f"{path}: the row starting at line {start} runs on to line "
                        f"{reader.line_num}, where it is not valid CSV ({exc}): a quote opened "
                        f"at line {start} is probably not closed; close it (a quote inside a "
                        'quoted field is written twice: "")'
                    ) from None
                raise InvalidInputError(
                    f"{path}: line {reader.line_num} is not valid CSV ({exc}); a field that "
                    'holds a quote is quoted whole, with the quote written twice: "5"" tall"'
                ) from None
            if row:
                rows.append(row)
                lines.append(start)
    finally:
        csv.field_size_limit(old)
    # A spreadsheet's export may end in rows of empty fields (",,,"): nothing follows them, so
    # they are dropped like blank lines (they were refused as missing values). Inside the data
    # such a row is kept, and refused with its line.
    while len(rows) > 1 and not any(v.strip() for v in rows[-1]):
        rows.pop()
        lines.pop()
    return rows, lines


def read_csv(path: Path | str) -> CsvFile:
    """The file at ``path`` with a header and at least the header (data rows may be none)."""
    path = Path(path)
    raw = path.read_bytes()
    rows, lines = _parse(path, _decode(path, raw))
    if not rows:
        raise InvalidInputError(f"{path}: empty file (a CSV needs a header line)")
    header = [h.strip() for h in rows[0]]
    unnamed = [j + 1 for j, h in enumerate(header) if not h]
    if unnamed:
        raise InvalidInputError(
            f"{path}: header column(s) {unnamed} have no name; name every column or remove it"
        )
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        # Taking the first of two same-named columns would silently drop the other.
        raise InvalidInputError(
            f"{path}: the header repeats the column name(s) {repeated}; each column needs its "
            "own name"
        )
    out = CsvFile(path, raw, header, rows[1:], lines[1:])
    for i, r in enumerate(out.rows):
        if len(r) != len(header):
            # A ';' file with decimal commas splits at its commas: say the delimiter first.
            raise InvalidInputError(
                f"{path}: {out.where(i)} has {len(r)} fields, the header {len(header)}"
                + (
                    delimiter_hint(header)
                    or ": write one field per column, and quote fields that hold commas"
                )
            )
    return out
