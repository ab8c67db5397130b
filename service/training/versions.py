"""The two versions `train` writes: checked before training, and all or nothing after it.

Before any training (minutes for a text model), the name and `--version` are checked against
the manifest's patterns and the version must be free: an invalid one used to fail only when the
manifest was written, after training, leaving files behind (outside `<out>/<name>/` for
"../escape"). After training, version N is saved and calibrated into N + 1 inside a hidden
staging directory in `<out>/<name>/` (the registry skips hidden names; the pattern of
`service.packaging.destination.staged`), and both are renamed into place only at the end. A
failed calibration, an exception or SIGTERM/SIGHUP (turned into SystemExit meanwhile, so that
the cleanup runs) therefore leaves no uncalibrated version N to be served or to block a rerun
with "already exists": before, a SIGTERM during calibration left version N in place.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from service.calibration.recalibration import Result, calibrate_bundle, next_version
from service.errors import BundleError, InvalidInputError, McServeError, ModelError
from service.packaging import destination

METHOD_FLAG = "--calibration-method"  # train's name for calibrate's --method
_PLAIN = (InvalidInputError, BundleError, ModelError)  # re-raised with the message prefixed
# What a service manager or a closed terminal sends: their default action ends the process at
# once, so no `finally` or `except` would run.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def check_names(name: str, version: str) -> None:
    """Refuse a name or version no bundle may have (the manifest's patterns)."""
    try:
        destination.check(name, version)
    except BundleError as exc:
        raise InvalidInputError(f"--{exc.message}") from None  # "--version '../x': use ..."


def check_free(out: Path, name: str, version: str) -> None:
    """Refuse a version that already exists (asked again, atomically, when it is written), and
    an `--out` where ``<out>/<name>/`` cannot be made or written: found only after training
    before, as a raw "[Errno 20] Not a directory"."""
    model_dir = out / name
    base = model_dir  # the nearest path that exists: the directories below it are to be made
    while not (base.exists() or base.is_symlink()) and base.parent != base:
        base = base.parent
    if not base.is_dir():
        what = "a dangling link" if base.is_symlink() and not base.exists() else "not a directory"
        raise InvalidInputError(
            f"--out {out}: {base} is {what}, so {model_dir} cannot be made; give a directory, "
            "or a path that does not exist yet, as --out"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"--out {out}: {base} is not writable by this user, so {model_dir} cannot be "
            "written; give a directory you may write to as --out"
        )
    destination.refuse_existing(model_dir / version)


def _stop(signum: int, frame: FrameType | None) -> NoReturn:
    print(f"error: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    raise SystemExit(128 + signum)  # the shell's code for "ended by this signal"


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit, so that cleanups run; the previous
    handlers are restored after it. (Only the main thread may set handlers: elsewhere a no-op.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Only where the signal would end the process: one ignored (SIGHUP under nohup) stays
    # ignored, and a handler someone installed stays theirs.
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS if _ends(s)}
    try:
        yield
    finally:
        _restore(previous)


def _ends(s: int) -> bool:
    """Whether signal `s` would end this run now (its default action, or ours, or Ctrl-C's)."""
    return signal.getsignal(s) in (signal.SIG_DFL, None, _stop, signal.default_int_handler)


def _restore(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


def write_calibrated(
    out: Path,
    name: str,
    version: str,
    save: Callable[[Path], Path],
    write_csv: Callable[[Path], None],
    seed: int,
    method: str,
) -> Result:
    """Save version ``version`` (``save(repo)`` writes it into the model repository ``repo`` and
    returns its path) and calibrate it, on the rows ``write_csv`` writes into a temporary CSV,
    into the next version; both appear in ``<out>/<name>/`` together, or neither does."""
    model_dir = out / name
    with interruptible():
        calibrated = next_version(out, name, version)
        made = [p for p in (out, model_dir) if not p.exists()]
        model_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix=".train-", dir=model_dir) as tmp:
                stage = Path(tmp)
                bundle = save(stage)
                result = _calibrate(bundle, write_csv, stage, name, seed, method, calibrated)
                _place(stage / name, model_dir, [version, calibrated])
        except BaseException:
            for p in reversed(made):  # what this made, if it holds nothing else
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
            raise
    return replace(result, path=model_dir / calibrated)


def _calibrate(
    bundle: Path,
    write_csv: Callable[[Path], None],
    repo: Path,
    name: str,
    seed: int,
    method: str,
    version: str,
) -> Result:
    try:
        with tempfile.TemporaryDirectory(prefix="mcserve-train-") as tmp:
            cal_csv = Path(tmp) / f"{name}-calibration.csv"
            write_csv(cal_csv)
            return calibrate_bundle(
                bundle, cal_csv, repo, seed=seed, method=method, method_flag=METHOD_FLAG,
                version=version,
            )  # fmt: skip
    except McServeError as exc:
        kind = type(exc) if type(exc) in _PLAIN else McServeError
        raise kind(
            f"calibrating the trained model failed, so no version of {name!r} was written "
            f"(neither {bundle.name} nor {version}): {exc.message}"
        ) from None


def _place(staged: Path, model_dir: Path, versions: list[str]) -> None:
    """Rename the staged ``versions`` into ``model_dir``: all of them or (on an error) none."""
    placed: list[Path] = []
    with _deferred() as pending:  # a SIGTERM between two renames would leave version N alone
        try:
            for v in versions:
                destination.refuse_existing(model_dir / v)  # another run may have written it
                (staged / v).rename(model_dir / v)  # atomic; replaces only an empty directory
                placed.append(model_dir / v)
        except BaseException:
            pending.append(0)  # take them back (below), then raise
            raise
        finally:
            if pending:  # a stop signal acts when the block ends: the run ends "stopped"
                for p in placed:
                    destination.remove(p)


@contextmanager
def _deferred() -> Iterator[list[int]]:
    """The stop signals and Ctrl-C that would end the run wait until the block ends, then act
    (the block sees them in the list it is given). (Blocking them with pthread_sigmask would not
    do: another thread may receive them.)"""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    # Only signals that would end the run (an ignored SIGHUP under nohup stays ignored).
    previous = {s: signal.signal(s, hold) for s in (*STOP_SIGNALS, signal.SIGINT) if _ends(s)}
    try:
        yield pending
    finally:
        _restore(previous)
        for s in [s for s in pending if s][:1]:
            signal.raise_signal(s)
