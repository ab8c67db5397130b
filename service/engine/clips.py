"""How an audio model's clips arrive: /v1's `{"b64": ...}` instances and WAV files on disk (the
command line, `calibrate`), turned into the model's input by service.engine.audio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.bundle.spec import AudioInput, InputSpec
from service.engine.audio import AudioBatch, audio_batch
from service.engine.inputs import check_count
from service.errors import InvalidInputError


def clip_of(i: int, inst: Any, item: str = "instance") -> str:
    """/v1's form of a clip: {"b64": "<base64 of a WAV file>"} (TF Serving's and KServe v1's
    form for binary values). The base64 text, not yet decoded."""
    if not isinstance(inst, dict) or set(inst) != {"b64"} or not isinstance(inst["b64"], str):
        raise InvalidInputError(
            f'{item} {i}: an audio instance is {{"b64": "<the WAV file in base64>"}}'
        )
    return str(inst["b64"])


def read_clip_file(file: Path, a: AudioInput, where: str) -> bytes:
    """A WAV file's bytes from disk for the command line and `calibrate`: a regular file only
    (a FIFO blocked for ever, /dev/zero never ended), at most the model's limit read (`predict
    --audio /dev/zero` took 5 GB). Each refusal is an InvalidInputError said of `where`."""
    try:
        if file.exists() and not file.is_file():
            raise InvalidInputError(f"{where}: {str(file)!r} is not a file")
        with file.open("rb") as fh:
            data = fh.read(a.max_audio_bytes + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise InvalidInputError(
            f"{where}: cannot read {str(file)!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if len(data) > a.max_audio_bytes:
        raise InvalidInputError(
            f"{where}: {str(file)!r} is over this model's limit of {a.max_audio_bytes} bytes "
            "(inputs.audio.max_audio_bytes): cut it"
        )
    return data


def clips_of(instances: Any, max_instances: int) -> list[str]:
    """The clips of /v1's instances ({"b64": ...} each), counted, still in base64: what is
    checked before any file is decoded."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError('\'instances\' must be a non-empty list of {"b64": "..."} clips')
    check_count(len(instances), max_instances)
    return [clip_of(i, v) for i, v in enumerate(instances)]


def instances_batch(
    instances: Any, spec: InputSpec, max_instances: int, body_bytes: int | None = None
) -> AudioBatch:
    """/v1's instances ({"b64": ...} each) as an audio model's input array."""
    clips = clips_of(instances, max_instances)
    return audio_batch(clips, spec, max_instances, body_bytes=body_bytes)
