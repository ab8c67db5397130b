"""How an audio model's clips arrive: /v1's `{"b64": ...}` instances, /v2's BYTES elements and
WAV files on disk (the command line, `calibrate`), counted and checked for what needs no
decoding (`checked_clips`: the adapters do this before the queue's room is checked), then
turned into the model's input array by service.engine.audio (`audio_batch`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.bundle.spec import AudioInput, InputSpec
from service.engine.audio import AudioBatch, clip_bytes, encode_audio
from service.engine.inputs import check_count, checked
from service.engine.wav import check_header
from service.errors import InvalidInputError, PayloadTooLargeError


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


def clip_limit(a: AudioInput, body_bytes: int) -> int:
    """The clips a request may hold: what a body of `body_bytes` holds of clips of the model's
    length in their smallest form (8-bit mono WAV, raw in /v2's binary extension: 4 + 44 +
    samples bytes), so no request of full clips that fits the body is refused. Every clip is
    padded to that length, so a request of 1,024 one-sample files cost as much as 1,024 full
    clips (16 s and 3 GB for a 10 s model, and a 164 MB audit record, from a 79 kB body:
    review G)."""
    return max(1, body_bytes // (48 + a.samples))


def checked_clips(
    clips: Sequence[bytes | str],
    spec: InputSpec,
    max_instances: int,
    item: str = "instance",
    body_bytes: int | None = None,
) -> list[bytes]:
    """The clips as WAV files' bytes, counted (max_instances; `body_bytes`: a request's body
    limit, which bounds its clips, clip_limit; None, a CSV or a replay: no such bound), each
    out of its base64, within the model's size limit and with a RIFF/WAVE header: what needs
    no decoding, so a malformed clip is a 4xx before the queue's room is checked."""
    a = spec.audio
    assert a is not None
    if not clips:
        raise InvalidInputError("'instances' must be a non-empty list of clips")
    check_count(len(clips), max_instances)
    most = clip_limit(a, body_bytes) if body_bytes is not None else len(clips)
    if len(clips) > most:
        raise PayloadTooLargeError(
            f"{len(clips)} clips in one request; this model takes at most {most}, what the body "
            f"limit ({body_bytes} bytes, setting max_body_bytes) holds of its {a.seconds:g} s "
            f"clips at its {a.sample_rate} Hz in their smallest form (8-bit mono WAV); every "
            "clip is featurised at that length, a shorter one padded and one at a lower rate "
            "resampled, and costs as much: split the request"
        )
    out = []
    for i, clip in enumerate(clips):
        where = f"{item} {i}"
        data = clip_bytes(clip, a, where)
        check_header(data, where, a.sample_rate)
        out.append(data)
    return out


def audio_batch(
    clips: Sequence[bytes | str],
    spec: InputSpec,
    max_instances: int,
    item: str = "instance",
    body_bytes: int | None = None,
) -> AudioBatch:
    """An audio model's input array [B, *shape] from its clips, counted, encoded and checked
    (finite, the manifest's value_range) as any input array is. `body_bytes`: a request's body
    limit, which bounds its clips (clip_limit); None (a CSV, a replay): no such bound."""
    a = spec.audio
    assert a is not None
    batch = encode_audio(checked_clips(clips, spec, max_instances, item, body_bytes), a, item)
    if spec.value_range is not None:  # said of the clip: its features are not what was sent
        lo, hi = spec.value_range
        for i, f in enumerate(batch.x):
            low, high = float(f.min()), float(f.max())
            if low < lo or high > hi:
                raise InvalidInputError(
                    f"{item} {i}: the clip's features run from {low:.4g} to {high:.4g}, outside "
                    f"this model's range [{lo:g}, {hi:g}]: is the clip clipped, mis-scaled or "
                    "not what the model was trained on?"
                )
    x = checked(batch.x.reshape(len(clips), *spec.shape), spec)
    return dataclasses.replace(batch, x=x)
