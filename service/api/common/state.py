"""What the app holds while it runs: settings, the registry, one batcher per model version."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engine.batcher import Batcher
from service.engine.registry import Registry
from service.engine.worker import ComputeProcess
from service.errors import ModelNotReadyError
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    executor: ThreadPoolExecutor
    remote: ComputeProcess | None = None  # the compute process; None: the executor computes
    batchers: dict[tuple[str, str], Batcher] = field(default_factory=dict)
    started: bool = False
    draining: bool = False
    # More reasons to be unready (e.g. the audit store cannot be written): each returns a
    # reason for clients, or None.
    checks: list[Callable[[], str | None]] = field(default_factory=list)
    # Without required_models: the names loaded at start-up, and those ready since. A model
    # that first appears later and was never ready (a copy half done, a broken bundle) made
    # every replica sharing the volume unready at once (reviewer LC).
    counted: set[str] = field(default_factory=set)

    def required(self) -> set[str]:
        if self.settings.required_models is not None:
            return set(self.settings.required_models)
        names = {e.name for e in self.registry.entries()}
        if not self.started:  # start-up: every model found counts
            return names
        return names & self.counted  # found at start-up or ready since (lifecycle._load)

    def not_ready_reasons(self) -> list[str]:
        """Empty when ready: every required model loaded and warmed, not draining."""
        if not self.started:
            return ["starting: models are loading"]
        if self.draining:
            return ["shutting down"]
        reasons = []
        entries = self.registry.entries()
        for name in sorted(self.required()):
            versions = [e for e in entries if e.name == name]
            if not versions:
                reasons.append(f"required model '{name}' was not found")
            elif not any(e.ready for e in versions):
                # /readyz is open to anyone: the reason without server paths
                reasons.append(f"model '{name}': {self.registry.reason(versions[-1])}")
        reasons.extend(r for r in (check() for check in self.checks) if r)
        return reasons

    def batcher(self, name: str, version: str | None) -> Batcher:
        model = self.registry.get(name, version)
        batcher = self.batchers.get((model.name, model.version))
        if batcher is None:  # lifecycle attaches batchers before registering: a brief race only
            raise ModelNotReadyError(f"model '{name}' version '{model.version}' is not ready yet")
        return batcher
