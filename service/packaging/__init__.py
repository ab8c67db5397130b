"""Packaging: a user's `nn.Module` plus an example input -> a bundle directory.

Tracing the module and checking it (functional dropout, a graph that rebuilds to the same
outputs, the MC sampler's output shape, the ONNX export) uses the engine, so packaging sits
above `engine/`; the format it writes (`bundle/`) sits below and knows nothing of it.
`writer.save` is the Python call, `cli.package` the `python -m service package` command.
"""

from service.packaging.writer import save

__all__ = ["save"]
