"""WAV files to samples, or a message that says exactly what is wrong with the file.

A hand-read RIFF parser rather than a library: Python 3.11's `wave` reads only integer PCM (no
float, no WAVE_FORMAT_EXTENSIBLE, which most recorders write for more than two channels or 24
bits), and scipy is not a serving dependency. It reads what recorders and `soundfile`/`scipy`
write: integer PCM of 8 (unsigned), 16, 24 and 32 bits and IEEE float of 32 and 64 bits, plain
or extensible, any number of channels (averaged to one), chunks in any order, and a streamed
file's unset data length (0xFFFFFFFF: to the RIFF's end where that is set, else the file's). It
checks every length against the bytes it has (a cut or lying header is refused, never read
past), decodes only the frames a model reads, and is tested against scipy.io.wavfile and
libsndfile (tests/engine/test_wav.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInputError

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
# The GUID an extensible format's subformat ends with (KSDATAFORMAT_SUBTYPE_*); its first two
# bytes are the plain format tag.
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
MAX_CHANNELS = 64
_FIX = "e.g. ffmpeg -i IN -ar {rate} -ac 1 -c:a pcm_s16le OUT.wav"
# What a file that is not a WAV file starts with, to say what it is.
_OTHER = {
    b"fLaC": "a FLAC file",
    b"OggS": "an Ogg (Vorbis/Opus) file",
    b"ID3": "an MP3 file",
    b"\xff\xfb": "an MP3 file",
    b"\xff\xf3": "an MP3 file",
    b"RIFX": "a big-endian WAV file (RIFX)",
    b"RF64": "an RF64 (over 4 GB) WAV file",
    b"FORM": "an AIFF file",
}


@dataclass(frozen=True)
class Clip:
    """A decoded file: mono samples in [-1, 1] (float64) and its sample rate in Hz."""

    samples: np.ndarray
    sample_rate: int
    channels: int
    frames: int  # the file's whole length in frames (samples may hold only its first ones)


def _refuse(item: str, what: str, rate: int) -> InvalidInputError:
    return InvalidInputError(f"{item}: {what}; send a WAV file ({_FIX.format(rate=rate)})")


# Float samples are nominally in [-1, 1]; past this a file is mis-scaled (its features would
# overflow near 1e150, and say nothing long before).
MAX_FLOAT_SAMPLE = 1000.0
UNKNOWN_LENGTH = 0xFFFFFFFF  # a data length a streaming writer (ffmpeg to a pipe) leaves unset


def check_header(data: bytes, item: str = "the clip", rate_hint: int = 16000) -> None:
    """Refuse (InvalidInputError) what has no RIFF/WAVE header, saying what it is instead."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = next((k for m, k in _OTHER.items() if data.startswith(m)), None)
        if kind is None:
            what = "is empty" if not data else "is not a WAV file (no RIFF/WAVE header)"
        else:
            what = f"is {kind}, not a WAV file"
        raise _refuse(item, f"the audio {what}", rate_hint)


def read_wav(
    data: bytes,
    item: str = "the clip",
    rate_hint: int = 16000,
    max_frames: int | Callable[[int], int] | None = None,
) -> Clip:
    """Decode a WAV file's bytes. `item` names it in messages ("instance 3"); `rate_hint` is the
    sample rate the conversion command in a refusal suggests (the model's); `max_frames`: decode
    at most this many frames, or a function of the file's sample rate giving it (a model reads
    a fixed length: the rest is counted, not decoded)."""
    check_header(data, item, rate_hint)
    fmt: bytes | None = None
    pcm: memoryview | None = None
    streamed = False  # the data's length read from the RIFF's (or the file's) end
    overrun = ""  # a chunk that claims more bytes than the file holds
    view, at = memoryview(data), 12
    while at + 8 <= len(data):
        cid, size = data[at : at + 4], struct.unpack_from("<I", data, at + 4)[0]
        at += 8
        if cid == b"data" and size == UNKNOWN_LENGTH and pcm is None:
            # A streamed file: its samples run to the RIFF's end where that is set (a chunk
            # after them is no samples), else to the file's.
            riff = struct.unpack_from("<I", data, 4)[0]
            end = 8 + riff if riff != UNKNOWN_LENGTH and at < 8 + riff <= len(data) else len(data)
            size, streamed = end - at, True
        if at + size > len(data):
            if cid == b"data":
                raise _refuse(
                    item,
                    f"the data chunk declares {size} bytes but the file holds {len(data) - at} "
                    "after it (the file is cut short)",
                    rate_hint,
                )
            name = cid.decode("latin-1").strip()
            overrun = f" (its '{name}' chunk declares {size} bytes but {len(data) - at} remain)"
            break  # a trailing chunk cut short after the data: the samples are whole
        if cid == b"fmt " and fmt is None:
            fmt = data[at : at + size]
        elif cid == b"data" and pcm is None:
            pcm = view[at : at + size]
        at += size + (size & 1)  # chunks are padded to an even length
    if fmt is None or pcm is None:
        missing = "fmt" if fmt is None else "data"
        raise _refuse(item, f"the WAV file has no '{missing}' chunk{overrun}", rate_hint)
    tag, channels, rate, bits = _format(fmt, item, rate_hint)
    width = bits // 8
    block = width * channels
    if streamed and block % 2 and len(pcm) % block == 1:  # an odd chunk's pad byte
        pcm = pcm[:-1]  # (8-bit mono's cannot be told from a sample: it is read as one)
    if len(pcm) % block:
        raise _refuse(
            item,
            f"the data chunk's {len(pcm)} bytes are not whole frames of {channels} channel(s) "
            f"of {bits} bits",
            rate_hint,
        )
    if not pcm:
        raise InvalidInputError(f"{item}: the WAV file holds no samples")
    frames = len(pcm) // block
    most = max_frames(rate) if callable(max_frames) else max_frames
    read = frames if most is None else min(frames, most)
    values = _samples(pcm[: read * block], tag, width).reshape(-1, channels)
    if tag == FLOAT:
        if not np.isfinite(values).all():
            raise InvalidInputError(f"{item}: the WAV file's float samples include NaN or Infinity")
        loudest = float(np.abs(values).max())
        if loudest > MAX_FLOAT_SAMPLE:
            raise InvalidInputError(
                f"{item}: the WAV file's float samples reach {loudest:.3g}; float samples are "
                f"nominally in [-1, 1] (at most {MAX_FLOAT_SAMPLE:g} is read): rescale the clip"
            )
    mono = values[:, 0] if channels == 1 else values.mean(axis=1)
    return Clip(mono, rate, channels, frames)


def _format(fmt: bytes, item: str, hint: int) -> tuple[int, int, int, int]:
    """(PCM or FLOAT, channels, sample rate, bits per sample) from a fmt chunk."""
    if len(fmt) < 16:
        raise _refuse(item, f"the WAV file's fmt chunk is {len(fmt)} bytes, under 16", hint)
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == EXTENSIBLE:
        if len(fmt) < 40 or fmt[26:40] != _GUID_TAIL:
            raise _refuse(item, "the WAV file's extensible format has no known subformat", hint)
        tag = struct.unpack_from("<H", fmt, 24)[0]
    known = {PCM: (8, 16, 24, 32), FLOAT: (32, 64)}
    if tag not in known:
        raise _refuse(
            item,
            f"the WAV file's samples are in format {tag:#06x} (compressed?); only integer PCM "
            "and IEEE float are read",
            hint,
        )
    if bits not in known[tag]:
        kind = "integer PCM" if tag == PCM else "float"
        raise _refuse(item, f"{bits}-bit {kind} samples are not read (only {known[tag]})", hint)
    if not 1 <= channels <= MAX_CHANNELS:
        raise _refuse(item, f"the WAV file declares {channels} channels", hint)
    if rate < 1:
        raise _refuse(item, "the WAV file declares a sample rate of 0", hint)
    if align != channels * bits // 8:
        raise _refuse(
            item,
            f"the WAV file's block align is {align}, not {channels} channel(s) x {bits // 8} bytes",
            hint,
        )
    return tag, channels, rate, bits


def _samples(pcm: memoryview, tag: int, width: int) -> np.ndarray:
    """The interleaved samples as float64, integers scaled to [-1, 1)."""
    if tag == FLOAT:
        return np.frombuffer(pcm, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(pcm, np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:  # little-endian 24-bit: widened into the top of an int32
        raw = np.frombuffer(pcm, np.uint8).reshape(-1, 3)
        wide = np.zeros((raw.shape[0], 4), np.uint8)
        wide[:, 1:] = raw
        return wide.view("<i4").ravel().astype(np.float64) / 2.0**31
    dtype = "<i2" if width == 2 else "<i4"
    return np.frombuffer(pcm, dtype).astype(np.float64) / 2.0 ** (8 * width - 1)
