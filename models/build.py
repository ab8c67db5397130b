"""Build the bundled demonstration models: `python -m models.build [--only NAME]`.

Each recipe trains from data that ships with scikit-learn and writes its bundle and its
calibration and test rows into a hidden temporary directory next to the target; only a finished
build replaces `models/<name>/<version>/` (version 1, or the recipe's `VERSIONS` entry) and
`models/data/<name>-{calibration,test}.csv`. Rebuilding on
the same machine gives bit-identical files (seeded, one thread, deterministic kernels); the summary
says whether each bundle's digest changed. See docs/MODELS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models import breast_cancer, common, diabetes, digits, medical_abstracts
from service.bundle.manifest import MANIFEST_NAME

Recipe = Callable[[Path, Path], Path]
RECIPES: dict[str, Recipe] = {
    breast_cancer.NAME: breast_cancer.build,
    diabetes.NAME: diabetes.build,
    digits.NAME: digits.build,
    medical_abstracts.NAME: medical_abstracts.build,
}


# A recipe whose network changed builds a new version beside the old ones (immutable bundles).
VERSIONS: dict[str, str] = {medical_abstracts.NAME: medical_abstracts.VERSION}


def _digest(bundle: Path) -> str | None:
    manifest = bundle / MANIFEST_NAME
    if not manifest.is_file():
        return None
    return "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _publishable(bundle: Path) -> None:
    """World-readable files: safetensors writes weights as 0600, which a container's non-root user
    (the image copies `models/` as built) could not read. Modes are not part of any hash."""
    bundle.chmod(0o755)
    for f in bundle.iterdir():
        f.chmod(0o644)


def build_one(name: str, out_dir: Path, data_dir: Path) -> tuple[Path, str, float]:
    """Build `name` and put it at `<out_dir>/<name>/<version>/`, replacing what was there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / name / VERSIONS.get(name, common.VERSION)
    before = _digest(dest)
    start = time.perf_counter()
    # A hidden (dot) directory on the same file system: the registry skips it and the final move
    # is a rename. The CSVs are staged there too: a failed build leaves old bundle and rows alone.
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=out_dir) as tmp:
        staged = Path(tmp) / "data"
        built = RECIPES[name](Path(tmp) / "bundles", staged)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        built.rename(dest)
        data_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(staged.iterdir()):
            f.replace(data_dir / f.name)
    _publishable(dest)
    seconds = time.perf_counter() - start
    after = _digest(dest)
    status = "new" if before is None else ("unchanged" if before == after else "changed")
    return dest, f"{status} {after}", seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument("--only", choices=sorted(RECIPES), help="build just this model")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=common.MODELS_DIR,
        help="bundle repository to write (default: models/); CSVs go to <out-dir>/data/",
    )
    args = parser.parse_args(argv)
    names = [args.only] if args.only else list(RECIPES)
    total = time.perf_counter()
    for name in names:
        dest, status, seconds = build_one(name, args.out_dir, args.out_dir / "data")
        print(f"{name}: {dest} ({_size(dest) / 1024:.0f} KiB, {seconds:.1f} s) {status}")
    print(f"built {len(names)} model(s) in {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
