"""The sampler's splits, one per dropout-site setting (`dropout_sites`: the last k sites).

Every model has its full split (every site sampled). Other settings are split on first use and
the last `MAX_PLANS` kept, least recently used out; a model's default setting is pinned and never
evicted. Each split holds a prefix and a suffix graph over the model's own weights (a rewritten
prefix may hold a copy of its part, prefix.py), so the cache is bounded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.engine.graph import SplitGraph
from service.engine.prefix import Prefix
from service.errors import InvalidInputError, ModelError

# Splits kept per model for settings other than "all".
MAX_PLANS = 4


@dataclass(frozen=True)
class Plan:
    """One dropout-site setting's split: its prefix (runs once per input) and suffix."""

    graph: SplitGraph
    prefix: Prefix


class Plans:
    """The splits of one model's `sites` dropout sites; `build(k)` splits for the last k."""

    def __init__(self, build: Callable[[int | None], Plan], full: Plan, sites: int) -> None:
        self._build, self.full, self.sites = build, full, sites
        self.cached: OrderedDict[int, Plan] = OrderedDict()
        self.pinned: dict[int, Plan] = {}  # a model's default setting: never evicted
        self._lock = threading.Lock()

    def get(self, sites: int | None) -> Plan:
        """The split that samples the last `sites` dropout sites (None or all of them: the
        full split), built on first use."""
        if sites is None or sites == self.sites:
            return self.full
        with self._lock:
            found = self.pinned.get(sites)
            if found is not None:
                return found
            found = self.cached.get(sites)
            if found is not None:
                self.cached.move_to_end(sites)
                return found
        try:  # outside the lock: splitting takes a while and other settings need not wait
            built = self._build(sites)
        except ModelError as exc:  # e.g. a late site that does not reach the output
            raise InvalidInputError(
                f"dropout_sites={sites} cannot be sampled for this model ({exc}); use 'all'"
            ) from exc
        with self._lock:
            self.cached[sites] = built
            self.cached.move_to_end(sites)
            while len(self.cached) > MAX_PLANS:
                self.cached.popitem(last=False)
        return built

    def pin(self, sites: int | None) -> None:
        """Build the split for `sites` now and keep it for good (a model's default setting)."""
        if sites is not None and sites != self.sites:
            built = self.get(sites)
            with self._lock:
                self.pinned[sites] = built
                self.cached.pop(sites, None)
