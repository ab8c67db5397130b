"""A request's instances as the engine's input array, whatever the model reads: numbers (arrays
or feature-keyed objects), texts (token ids) or WAV clips (log-mel features). The command line
and the audit replay read instances this way; the HTTP routes call the same encoders, each off
the event loop by its own measure of size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine.clips import instances_batch
from service.engine.inputs import to_array
from service.engine.model import ServedModel
from service.engine.text import encode_texts


@dataclass(frozen=True)
class Encoded:
    """The engine's array [B, *shape]; per instance, what the answer reports of its reading
    (a text's tokens, a clip's seconds; None for numbers)."""

    x: np.ndarray
    notes: list[dict[str, Any]] | None = None


def encode_instances(instances: Any, model: ServedModel, max_instances: int) -> Encoded:
    spec = model.manifest.inputs
    if spec.audio is not None:
        clips = instances_batch(instances, spec, max_instances)
        return Encoded(clips.x, clips.notes())
    if spec.text is not None:
        batch = encode_texts(instances, model.bundle.tokenizer, spec.text, max_instances)
        return Encoded(batch.ids, batch.notes())
    return Encoded(to_array(instances, spec, max_instances))
