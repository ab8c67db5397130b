"""Where a bundle version is written: `<out>/<name>/<version>/`, whole or not at all.

The name and version are checked against the manifest's own patterns before anything is
written: a version such as "../escape" had put files outside `<out>/<name>/`, and "v 1" or
".hidden" a directory without a manifest that blocked the next run. The files are then written
into a hidden directory inside `<out>/<name>/` (the registry skips hidden names) and renamed
into place only when complete, so a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from service.bundle.manifest import Manifest
from service.errors import BundleError


@cache
def _patterns() -> tuple[str, str]:
    props = Manifest.model_json_schema()["properties"]
    return props["name"]["pattern"], props["version"]["pattern"]


def check(name: str, version: str) -> None:
    """Refuse a name or version the manifest would refuse (and any path separator in them)."""
    name_pattern, version_pattern = _patterns()
    if not re.fullmatch(name_pattern, name):
        raise BundleError(
            f"name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (e.g. visits)"
        )
    if not re.fullmatch(version_pattern, version):
        raise BundleError(
            f"version {version!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (e.g. 1 or 2024-06)"
        )


def refuse_existing(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} already exists: bundle versions are immutable, pick a new one")


@contextmanager
def staged(out_dir: Path | str, name: str, version: str, what: str = "save") -> Iterator[Path]:
    """Yield an empty hidden directory to write the version into; when the block ends without
    an exception, move it to `<out_dir>/<name>/<version>` (checked first). On any failure the
    staged files and any directory this made are removed."""
    check(name, version)
    out = Path(out_dir)
    dest = out / name / version
    refuse_existing(dest)
    made = [p for p in (out, out / name) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # In the model directory itself: a rename cannot cross filesystems, and <out>/<name>
        # may be a mount or a link elsewhere. One level below a hidden directory, the registry
        # never takes it for a version.
        with tempfile.TemporaryDirectory(prefix=f".{what}-", dir=dest.parent) as tmp:
            work = Path(tmp) / version
            work.mkdir()  # its mode from the umask, as any directory the user makes
            yield work
            refuse_existing(dest)  # again: another run may have written it meanwhile
            work.rename(dest)  # atomic; replaces only an empty directory
    except BaseException:
        for p in reversed(made):  # what this made, if it holds nothing else
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def remove(dest: Path) -> None:
    """Remove a version this run wrote (e.g. one whose calibration then failed). Its model
    directory stays, even when empty: the user may have made it (the registry skips it)."""
    shutil.rmtree(dest, ignore_errors=True)
