"""A bundle's weights (`weights.safetensors`): every learned parameter finite, no NaN anywhere.

A NaN or infinite weight loaded and served: every MC answer a 500 ("samples contain NaN"), and
the deterministic path (dropout off, ONNX Runtime) confident answers from whatever the NaN
did not reach. Refused at load, naming the tensor, and by `save` before anything is written.
A buffer or traced constant may hold an infinity (a causal mask of -inf is one); never NaN.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from service.errors import BundleError


def check_finite(
    state: Mapping[str, torch.Tensor], where: str, parameters: Collection[str]
) -> None:
    """BundleError naming the first tensor (in name order) that holds NaN, or an infinity when
    it is one of the learned `parameters`."""
    for name in sorted(state):
        t = state[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        learned = name in parameters
        ok = torch.isfinite(t) if learned else ~torch.isnan(t)
        if bool(ok.all()):
            continue
        bad = int((~ok).sum())
        first = t[~ok].flatten()[0].item()
        what = "not finite" if learned else "NaN"
        raise BundleError(
            f"{where}: tensor '{name}' holds {first} ({bad} of its {t.numel()} values are "
            f"{what}); a model's weights are finite numbers: check the training run that made "
            "them (a diverged loss) and package weights from before it"
        )
