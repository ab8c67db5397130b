"""One node id per schemathesis operation.

pytest 9 builds a Function's node id from `originalname` and its callspec; schemathesis 4.32
passes the bare function name, so all 27 operations shared the id `test_api`. pytest-xdist keys
its work by node id and ran only one of them (and `-k`/`--lf` could not tell them apart). The
item's own name (`test_api[GET /v1/models]`) is unique: use it.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if type(item).__name__ == "SchemathesisFunction" and "[" not in item.nodeid:
            # What pytest itself derives from a node's name when none is given; the field is
            # private, and there is no public setter.
            item._id = item.parent.id.child(item.name)  # type: ignore[union-attr]
