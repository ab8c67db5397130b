"""What a rebuilt graph makes, measured on the meta device before any weight is assigned.

The graph runs on meta inputs (shapes only, no memory) of 2 and 4 instances; its tensors are
counted, and the Python values it computes (shapes, counts) are computed for real, so each
Python operation's cost is checked before it runs (service/bundle/architecture.py calls this).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from service.bundle.grammar import ArchitectureLimits
from service.errors import BundleError

# GraphModule.meta key: activation values one more input adds (the load's meta runs).
ACTIVATIONS_PER_INPUT = "mcserve_activations_per_input"


def check_activations(
    gm: fx.GraphModule,
    input_shape: list[int],
    dtype: torch.dtype,
    where: str,
    limits: ArchitectureLimits,
) -> None:
    """Run the graph on meta inputs of 2 and 4 instances: shapes only, no memory. What it makes
    must grow at most linearly with the batch (a graph sized by size(0) ** 2 passed a check at
    one batch and asked for 65 GB at a request's), and one more instance must add at most the
    limit. The per-instance count is kept on the module, for the engine's forward sizes."""
    made = [_elements(gm, [n, *input_shape], dtype, where, limits) for n in (2, 4)]
    if made[1] > 2 * made[0]:
        raise BundleError(
            f"{where}: the activations grow faster than the batch ({made[0]} values for 2 "
            f"inputs, {made[1]} for 4); a model's cost must be linear in its batch"
        )
    per_input = max(1, (made[1] - made[0]) // 2)
    fixed = made[0] - 2 * per_input  # what the graph makes whatever its batch
    for what, n in (("one input makes", per_input), ("any batch makes", fixed)):
        if n > limits.max_activation_elements:
            raise BundleError(
                f"{where}: {what} {n} activation values, over the limit of "
                f"{limits.max_activation_elements}"
            )
    gm.meta[ACTIVATIONS_PER_INPUT] = per_input


def _elements(
    gm: fx.GraphModule, shape: list[int], dtype: torch.dtype, where: str, limits: ArchitectureLimits
) -> int:
    example = torch.zeros(*shape, dtype=dtype, device="meta")
    try:
        interp = _Counting(gm, where, limits)
        with torch.device("meta"):  # a factory call without a device (arange) makes no memory
            interp.run(example)
    except _TooCostly as exc:
        raise BundleError(exc.args[0].splitlines()[0]) from None
    except BundleError:
        raise
    except Exception as exc:  # any shape error: the declared input does not fit the graph
        first = (str(exc).strip().splitlines() or [""])[0][:200]  # fx appends the whole graph
        raise BundleError(
            f"{where}: the model does not accept inputs of shape {shape[1:]} "
            f"({type(exc).__name__}: {first})"
        ) from exc
    return interp.elements


class _Counting(fx.Interpreter):
    """Runs the graph on meta tensors, counting what they would hold; Python values (shapes
    and counts) are computed for real, so their cost is checked before each operation."""

    def __init__(self, gm: fx.GraphModule, where: str, limits: ArchitectureLimits) -> None:
        super().__init__(gm)
        self.where, self.limits, self.elements = where, limits, 0

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _PYTHON_ARITHMETIC:
            args, _ = self.fetch_args_kwargs_from_env(n)
            why = _python_cost(n.target, args, self.limits)
            if why:  # not a BundleError here: fx would append the whole graph to its text
                raise _TooCostly(f"{self.where}: node '{n.name}': {why}")
        out = super().run_node(n)
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


class _TooCostly(Exception):
    """A Python operation of the graph refused before it ran (becomes a BundleError)."""


_PYTHON_ARITHMETIC = {operator.add, operator.mul, operator.pow, operator.floordiv}


def _python_cost(fn: Any, args: tuple[Any, ...], limits: ArchitectureLimits) -> str:
    """Why an operation on Python values would cost without bound ("" when it would not)."""
    if any(isinstance(a, torch.Tensor) for a in args):
        return ""  # a tensor's result is counted (and on meta costs nothing)
    bits = limits.max_integer_bits
    for a in args:
        if isinstance(a, int) and a.bit_length() > bits:
            return f"an integer over {bits} bits"
    seqs = [a for a in args if isinstance(a, list | tuple | str)]
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    if fn is operator.pow and len(ints) == 2 and abs(ints[0]) > 1 and ints[1] > bits:
        return f"{ints[0]} ** {ints[1]} is over {bits} bits"
    if fn is operator.mul and seqs and ints and len(seqs[0]) * ints[0] > limits.max_sequence:
        return f"a sequence repeated to over {limits.max_sequence} items"
    if fn is operator.add and len(seqs) == 2 and len(seqs[0]) + len(seqs[1]) > limits.max_sequence:
        return f"sequences joined to over {limits.max_sequence} items"
    return ""
