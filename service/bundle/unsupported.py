"""Why a layer or function outside the bundle vocabulary is refused, and what to write instead.

The vocabulary is architecture.py's (listed in docs/BUNDLES.md, "The bundle vocabulary"); a
refusal names the layer or function as the model wrote it, never as torch prints a builtin
('<built-in method full of type object at 0x7f..>'), and for what speech, image and sequence
models commonly hold, the equivalent the vocabulary has.
"""

from __future__ import annotations

from torch import fx

# Layers a speech or image model often has, and what to write instead from the vocabulary.
_INSTANCE = "use nn.GroupNorm(C, C), which normalises each channel alone (its weight and bias are "
_INSTANCE += "InstanceNorm's with affine=True)"
_GLOBAL_MAX = "for a global max use x.amax(dim=-1) (1-D) or x.amax(dim=(-2, -1)) (2-D)"
_LAYER_HINTS = {
    "InstanceNorm1d": _INSTANCE,
    "InstanceNorm2d": _INSTANCE,
    "GLU": "write a, b = x.chunk(2, dim); a * torch.sigmoid(b)",
    "AdaptiveMaxPool1d": _GLOBAL_MAX,
    "AdaptiveMaxPool2d": _GLOBAL_MAX,
}
# Tensors made in forward from a size (a size read from a text's length, with length buckets):
# the functions that allocate them are not in the vocabulary, but arange and comparisons are.
_MADE = {"full", "ones", "zeros", "empty", "triu", "tril", "eye", "rand", "randn"}


def function(n: fx.Node) -> str:
    """Why node `n`'s function cannot be in a bundle, with its name as the model wrote it."""
    f = n.target
    module = getattr(f, "__module__", None) or ("torch" if "torch" in repr(f) else "")
    name = f"{module}.{getattr(f, '__name__', f)}".lstrip(".")
    said = f"function {name} at node '{n.name}' is not in the bundle vocabulary (docs/BUNDLES.md)"
    if getattr(f, "__name__", "") in _MADE:
        return (
            f"{said}: a tensor made in forward from a size; build it from the input with "
            "torch.arange and comparisons (a causal mask: pos = torch.arange(x.size(1), "
            "device=x.device); mask = pos[None, :] > pos[:, None]), or pass buckets=None to "
            "save so the length is fixed and the tensor a constant"
        )
    return f"{said}: use one of the listed operations"


def layer(target: object, cls: str) -> str:
    """Why layer `target` of class `cls` cannot be in a bundle."""
    hint = f": {_LAYER_HINTS[cls]}" if cls in _LAYER_HINTS else ""
    return (
        f"layer '{target}' of type {cls} is not supported in a bundle{hint} (the layers a "
        "bundle takes: docs/BUNDLES.md, 'The bundle vocabulary')"
    )
