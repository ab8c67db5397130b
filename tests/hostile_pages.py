"""A bundle whose every free-text manifest string is markup that would run if a page did not
escape it (shared by the in-process page tests and the browser tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from nets import mlp

from service.bundle.manifest import Training
from service.packaging import save

# Each payload sets window.__xss when it runs: the browser test reads that flag.
SCRIPT = "<script>window.__xss = 'script'</script>"
IMG = "<img src=x onerror=\"window.__xss='img'\">"
QUOTE = '"><svg onload="window.__xss=\'attr\'">'
NAME = "xss"


def hostile_bundle(out_dir: Path) -> Path:
    torch.manual_seed(0)
    return save(
        mlp(0.25, d_in=3, hidden=8, d_out=2),
        torch.randn(4, 3),
        out_dir=out_dir,
        name=NAME,
        version="1",
        task="classification",
        intended_use=f"Use {SCRIPT} and {IMG}: not for clinical use",
        labels=[SCRIPT, IMG],
        feature_names=[QUOTE, "f'1", IMG],
        units=[SCRIPT, None, "mm"],
        valid_ranges=[(-10.0, 10.0)] * 3,
        training_ranges=[(-3.0, 3.0)] * 3,
        training=Training(provenance={"dataset": SCRIPT, QUOTE: IMG}, metrics={IMG: 1.0}),
    )
