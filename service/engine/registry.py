"""The model repository: every bundle under a directory, loaded or with the reason it is not.

Layouts: `<root>/<model>/<version>/manifest.json` or `<root>/<model>/manifest.json`. One broken
bundle never stops the others; it is listed with its reason.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.bundle.load import TrustPolicy, load_bundle
from service.bundle.manifest import MANIFEST_NAME
from service.engine.model import ServedModel
from service.errors import McServeError, ModelNotFoundError, ModelNotReadyError, shown_name

log = logging.getLogger("mcserve.registry")


@dataclass
class Entry:
    name: str
    version: str
    path: Path
    model: ServedModel | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.model is not None


# An absolute path, not inside a URL nor one of our routes (/v1/..., /v2/...): a slash that no
# word, dot, colon or slash precedes, then at least one more segment. Its last segment (a file
# name) is kept.
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~:/-])/(?!v[12]/)(?:[^\s'\"`:,;()\[\]{}<>]+/)+([^\s'\"`:,;()\[\]{}<>]*)"
)


def without_paths(reason: str, root: Path) -> str:
    """A failure reason for clients: paths inside the model repository relative to it
    (`diabetes/1/architecture.json`), any other absolute path cut to its last segment. The full
    reason stays in the log and in `python -m service models`."""
    for prefix in sorted({str(root.resolve()), str(root.absolute()), str(root)}, key=len)[::-1]:
        if prefix not in ("", ".", "/"):  # only as a whole path: not 'models/' of '/v1/models/'
            reason = re.sub(r"(?<![\w.~:/-])" + re.escape(prefix.rstrip("/") + "/"), "", reason)
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "(a path)", reason)


def whole(s: str) -> bool:
    """A whole number in ASCII digits ('²'.isdigit() is true, and int('²') fails)."""
    return s.isascii() and s.isdigit()


def version_key(v: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order: '10' after '9', numbers before words; ties ('010' and '10') by the text,
    so one is newest whatever order they came in. ASCII digits only: '²'.isdigit() is true,
    and int('²') failed, taking start-up or every later poll down."""
    return tuple((0, int(p), p) if whole(p) else (1, 0, p) for p in re.split(r"[._-]", v))


def discover(root: Path) -> list[tuple[str, str | None, Path]]:
    """(model directory name, version directory name or None, bundle path) for every bundle."""
    found: list[tuple[str, str | None, Path]] = []
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (model_dir / MANIFEST_NAME).is_file():
            found.append((model_dir.name, None, model_dir))
            continue
        # Hidden ones are a writer's work in progress (service/packaging/destination.py).
        versions = (p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for vdir in sorted(versions):
            if (vdir / MANIFEST_NAME).is_file():
                found.append((model_dir.name, vdir.name, vdir))
    return found


@dataclass(frozen=True)
class ModelFactory:
    """Builds a served model from a bundle directory; picklable, so the compute process builds
    its copy of each model exactly as the server built its own."""

    policy: TrustPolicy
    model_kwargs: dict[str, object]

    def __call__(self, path: Path, digest: str | None = None) -> ServedModel:
        """`digest`: the one the copy must have (checked before its artifacts are read)."""
        bundle = load_bundle(path, self.policy, expected_digest=digest)
        return ServedModel(bundle, **self.model_kwargs)  # type: ignore[arg-type]


class Registry:
    """Loaded models by name and version; thread-safe for readers and a single writer."""

    def __init__(self, root: Path, factory: Callable[[Path], ServedModel]) -> None:
        self.root = root
        self.factory = factory
        self._entries: dict[tuple[str, str], Entry] = {}
        # Sorted views, rebuilt on every change: every request looks its model up here.
        self._sorted: list[Entry] = []
        self._by_name: dict[str, list[Entry]] = {}
        self._lock = threading.Lock()

    @classmethod
    def with_policy(cls, root: Path, policy: TrustPolicy, **model_kwargs: object) -> Registry:
        return cls(root, ModelFactory(policy, model_kwargs))

    def load_all(self) -> list[Entry]:
        for name, version, path in discover(self.root):
            self.load(name, version, path)
        return self.entries()

    def load_model(self, name: str) -> list[Entry]:
        """Every version of one model only: the command line's `predict` loaded every model
        of the repository (nine text versions to answer one diabetes row: 3-5 s a call)."""
        for model, version, path in discover(self.root):
            if model == name:
                self.load(model, version, path)
        return self.versions(name)

    def load(self, name: str, version: str | None, path: Path) -> Entry:
        entry = self.build(name, version, path)
        self.add(entry)
        return entry

    def build(self, name: str, version: str | None, path: Path) -> Entry:
        """Load one bundle without registering it (so callers can warm it up first)."""
        try:
            model = self.factory(path)
            entry = Entry(model.name, model.version, path, model=model)
            if model.name != name or (version is not None and model.version != version):
                raise McServeError(
                    f"{path}: manifest says {model.name}/{model.version}, directory says "
                    f"{name}/{version or '(any)'}; they must agree"
                )
        except McServeError as exc:
            entry = Entry(name, version or "?", path, error=exc.message)
            log.warning("bundle refused", extra={"path": str(path), "reason": exc.message})
        except Exception as exc:  # a bundle must never take the others down with it
            entry = Entry(name, version or "?", path, error=f"{type(exc).__name__}: {exc}")
            log.exception("bundle failed to load", extra={"path": str(path)})
        return entry

    def add(self, entry: Entry) -> None:
        """Register atomically: unversioned requests see the newest ready version at once."""
        with self._lock:
            self._reindex({**self._entries, (entry.name, entry.version): entry})

    def _reindex(self, entries: dict[tuple[str, str], Entry]) -> None:
        """Make `entries` the registry's, its sorted views first: a failure leaves it as it was
        (an entry in the dict but not in the views was never served nor retired)."""
        ordered = sorted(entries.values(), key=lambda e: (e.name, version_key(e.version)))
        by_name: dict[str, list[Entry]] = {}
        for e in ordered:
            by_name.setdefault(e.name, []).append(e)
        self._entries, self._sorted, self._by_name = entries, ordered, by_name

    def paths(self) -> set[Path]:
        with self._lock:
            return {e.path for e in self._entries.values()}

    def unload(self, name: str, version: str) -> Entry | None:
        with self._lock:
            entries = dict(self._entries)
            entry = entries.pop((name, version), None)
            self._reindex(entries)
            return entry

    def reason(self, entry: Entry) -> str | None:
        """Why `entry` is not ready, as clients are told it (no server paths)."""
        return without_paths(entry.error, self.root) if entry.error is not None else None

    def entries(self) -> list[Entry]:
        return list(self._sorted)

    def versions(self, name: str) -> list[Entry]:
        return list(self._by_name.get(name, ()))

    def ready_versions(self, name: str) -> list[str]:
        """The versions a request may name (a metadata's `versions`): not one that failed to
        load, which answers 503."""
        return [e.version for e in self._by_name.get(name, ()) if e.ready]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(
                f"model '{shown_name(name)}' is not loaded; GET /v1/models lists the available "
                "models"
            )
        if version is None:
            ready = [e for e in versions if e.ready]
            if not ready:
                raise ModelNotReadyError(
                    f"model '{name}' is not ready: {self.reason(versions[-1])}"
                )
            entry = ready[-1]
        else:
            match = [e for e in versions if e.version == version]
            if not match:
                raise ModelNotFoundError(
                    f"model '{name}' has no version '{shown_name(version)}'; versions: "
                    f"{[e.version for e in versions]}"
                )
            entry = match[0]
            if not entry.ready:
                raise ModelNotReadyError(
                    f"model '{name}' version '{version}': {self.reason(entry)}"
                )
        assert entry.model is not None
        return entry.model
