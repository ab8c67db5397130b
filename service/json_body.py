"""A JSON request body as the parsers should read it: no byte-order mark, no repeated key.

RFC 8259 leaves an object with a repeated name to the parser; pydantic's keeps the last one, so
`{"age": 59, ..., "age": 70}` predicted with 70, and a second `parameters` object replaced the
first, without a word. A clinical answer must not depend on which copy a parser keeps: such a
body is refused, naming the key. jiter (pydantic's own parser) finds them in one pass, about
0.4x the cost of the validating parse; a body it cannot read at all is left to that parse,
whose messages say what is wrong.
"""

from __future__ import annotations

import re

import jiter

from service.errors import InvalidInputError, shown_name, without_bom

_DUPLICATE = re.compile(r'^Detected duplicate key "(.*)" at line (\d+) column (\d+)$', re.DOTALL)


def json_body(raw: bytes) -> bytes:
    """`raw` without a BOM; InvalidInputError when an object in it repeats a key."""
    body = without_bom(raw)
    try:
        jiter.from_json(body, catch_duplicate_keys=True, cache_mode="none")
    except ValueError as exc:
        found = _DUPLICATE.match(str(exc))
        if found is not None:
            key, line, column = found.groups()
            raise InvalidInputError(
                f"invalid request: body: the key {shown_name(key)!r} appears twice in one object "
                f"(line {line}, column {column}); send each key once"
            ) from None
    return body
