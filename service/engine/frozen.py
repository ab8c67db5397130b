"""The garbage collector's permanent generation: what start-up and model loads leave behind.

Full collections over torch's and FastAPI's long-lived objects caused 100-230 ms latency spikes
(service/api/app.py); freezing what a load created removes them. But a frozen object is never
collected: a model released later (unload, reload) stayed in memory for good, its reference
cycles (modules, graphs) out of the collector's reach. So a release unfreezes, collects and
freezes again what is left: one full collection per release, a rare event.
"""

from __future__ import annotations

import gc


def freeze() -> None:
    """Collect, then freeze what survives: it is long-lived from now on."""
    gc.collect()
    gc.freeze()


def collect_released() -> None:
    """After a release: what it dropped is collected, what is still held is frozen again.
    Call it once nothing but the collector refers to the released objects."""
    gc.unfreeze()
    freeze()
