"""What importing some modules drags in, measured in a fresh interpreter (layering tests)."""

from __future__ import annotations

import json
import subprocess
import sys


def imported_by(*modules: str) -> list[str]:
    """Every module in sys.modules after importing `modules` in a new Python process."""
    code = f"import sys, json, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def under(found: list[str], *packages: str) -> list[str]:
    """The modules of `found` that belong to any of `packages` (a package or a dotted prefix)."""
    return [m for m in found if any(m == p or m.startswith(p + ".") for p in packages)]
