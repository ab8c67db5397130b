"""How much one CPU forward may hold: its tokens (text models), its activation values (every
model), and what the deterministic prefix makes at a time. The sampler (sampler.py) sizes its
forwards from these when a model loads; tests and benchmarks set them on this module.
"""

from __future__ import annotations

from torch import nn

from service.bundle.activations import ACTIVATIONS_PER_INPUT

# Tokens one CPU forward of a text model holds: a chunk of L-token rows has
# max(min_rows, TOKEN_BUDGET // L) rows, fewer than the row budget, whose activations then stay
# in cache. Measured (2026-12-06, idle 2-vCPU AMD EPYC, 64 texts x 20 passes, bench.chunks):
# the TextCNN + fastText average at L = 900 answers 4.0x the documents/s with 64-row chunks as
# with 16,384, the transformer at L = 128 2.4x; 16 to 128 rows are all within 10 % of the best.
TOKEN_BUDGET = 8192
# Activation values one CPU forward may make (the load's meta count per input, summed over the
# graph's nodes: an upper bound on what is live at once): 1 GiB of float32, but never fewer rows
# than one mask block (64). Every bundled model stays under it at its row and token budgets; a
# model making 40 M values per input got 16,384-row forwards before (64 now: still 10 GB).
ACTIVATION_BUDGET = 1 << 28
# Values one prefix (or deterministic) forward may make, whatever the batch: the prefix runs over
# at most PREFIX_BUDGET // (the model's values per input) inputs at a time. It ran over every
# input of a batch at once, and medical-abstracts' TF-IDF member makes a dense table of 262,139
# bigram counts per text: one request of 1,024 abstracts held 3.2 GB, past a 2 GiB pod's limit.
PREFIX_BUDGET = 1 << 26


def rows_within(module: nn.Module, row_budget: int, budget: int | None = None) -> int:
    """`row_budget`, lowered so that one forward's activations stay within `budget`
    (ACTIVATION_BUDGET by default)."""
    budget = ACTIVATION_BUDGET if budget is None else budget  # read now: tests set it
    meta = getattr(module, "meta", None)
    per_input = meta.get(ACTIVATIONS_PER_INPUT) if isinstance(meta, dict) else None
    if not per_input:  # a module not rebuilt from a description (tests, .pt2)
        return row_budget
    return max(1, min(row_budget, budget // int(per_input)))
