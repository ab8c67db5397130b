"""What `save` runs before writing: the module against its rebuilt graph, and one MC pass.

A bundle is written only if its graph computes the module's function (in eval mode) and its
MC passes run: anything that would fail every MC request is refused at save, not served as 500s.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from service.engine.sampler import MCRequest, MCSampler
from service.errors import ModelError
from service.packaging.randomness import kept_modes

# Explicit attention sums in another order than torch's fused kernels: 1e-5, not 1e-6.
TOLERANCE = 1e-5


def one_tensor(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"the model returns a {type(out).__name__}, not a tensor: return one tensor "
            "[B, outputs]; for a noise head, torch.cat([mean, v], -1)"
        )
    return out


def check_reproduced(module: nn.Module, rebuilt: fx.GraphModule, example: torch.Tensor) -> None:
    """The module (in eval mode, its modes restored after) and its rebuilt graph agree.

    The module runs without torch's attention fast path: in inference it turns a padded batch
    into nested tensors and writes zeros at the padding (a model that pools over every position
    then gives another answer), a path training never takes and MC passes (dropout on) never
    take either; the bundle's graph computes what training computed."""
    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with kept_modes(module), torch.inference_mode():
            want = one_tensor(module.eval()(example))
            got = one_tensor(rebuilt(example))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    fail = "the module's forward cannot be reproduced from its traced graph"
    if want.shape != got.shape:
        raise ModelError(f"{fail}: it outputs {list(want.shape)}, the graph {list(got.shape)}")
    if torch.allclose(want, got, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True):  # NaN: both
        return
    diff = (want - got).abs().nan_to_num(nan=float("inf"))
    at = torch.unravel_index(diff.argmax(), diff.shape)
    row, col = int(at[0]), [int(i) for i in at[1:]]
    which = f"output {col[0] if len(col) == 1 else col} of example row {row}"
    raise ModelError(
        f"{fail}: {which} is {float(want[at]):.6g} from the module but {float(got[at]):.6g} from "
        f"the graph (largest difference {float(diff[at]):.3g}); the trace records tensor "
        "operations only, so a forward that depends on anything else (Python state, values "
        "read with .item() or .tolist(), in-place changes) computes another function"
    )


def check_mc_pass(sampler: MCSampler, example: torch.Tensor) -> None:
    """One short seeded MC pass, as a request would run it: a failure here is every request's."""
    x = example[:2].cpu().numpy()
    try:
        sampler.run([MCRequest(x, 2, 0)])
    except ModelError:
        raise
    except Exception as exc:  # whatever broke, every MC request would break the same way
        first = (str(exc).splitlines() or [""])[0][:300]
        raise ModelError(
            f"the bundle's MC passes fail on the example ({type(exc).__name__}: {first}), so "
            "every MC request would fail; check the dropout sites' inputs are batch-first "
            "tensors [B, ...]"
        ) from exc
