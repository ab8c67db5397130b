"""How far this process's compute has got, for the compute process's heartbeat (worker.py).

The heartbeat comes from a thread of its own, so it went on beating while the main thread was
stuck in a call that had released the GIL (a lock, a native library waiting for ever): the
server saw a live child and held its requests until their deadlines. Each forward of the
sampler counts here, and the heartbeat carries the count and whether a batch is being computed:
a child computing a batch whose count has not moved for `compute_stuck_s` (10 minutes by
default: longer than any one forward, ONNX run or summary may take) is stuck, whereas one
working through a long batch moves it at every forward. Loading a model counts nothing, and is
not judged by it.
"""

from __future__ import annotations

forwards = 0  # forwards run by this process (an int read by another thread: no lock needed)
computing = False  # a batch is being computed now (not a model load)


def tick() -> None:
    """One more forward (or one chunk of a prefix or deterministic pass, one ONNX run)."""
    global forwards
    forwards += 1


def begin() -> None:
    global computing
    computing = True


def end() -> None:
    global computing
    computing = False
