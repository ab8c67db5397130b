"""Training progress: a rich bar on a terminal, else a line per 10 % (for log files)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(show: bool, total: int, label: str) -> Iterator[Callable[[int, float], None] | None]:
    """An on_epoch callback: a rich bar on a terminal, else a line per 10 % (for log files)."""
    if not show:
        yield None
        return
    if not sys.stderr.isatty():
        start, every = time.perf_counter(), max(1, total // 10)

        def line(epoch: int, loss: float) -> None:
            if (epoch + 1) % every == 0 or epoch + 1 == total:
                elapsed = time.perf_counter() - start
                print(f"{label}: epoch {epoch + 1}/{total} loss {loss:.4f} {elapsed:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip

        yield line
        return
    from rich.progress import Progress  # optional dependency, only when asked for

    with Progress(transient=False) as bar:
        task = bar.add_task(label, total=total)

        def step(epoch: int, loss: float) -> None:
            bar.update(task, advance=1, description=f"{label} loss {loss:.4f}")

        yield step
