"""WAV files decoded as scipy.io.wavfile and soundfile (libsndfile) write and read them, and
every malformed file refused with a message that says what is wrong (service/engine/wav.py)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.wav import read_wav
from service.errors import InvalidInputError

RATE = 8000


def _signal(n: int = 400, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / RATE
    cols = [0.6 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)]
    return np.stack(cols, axis=1)


def _scipy(data: np.ndarray) -> bytes:
    out = io.BytesIO()
    scipy.io.wavfile.write(out, RATE, data)
    return out.getvalue()


def _soundfile(data: np.ndarray, subtype: str, container: str) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, data, RATE, subtype=subtype, format=container)
    return out.getvalue()


def _scaled(raw: np.ndarray) -> np.ndarray:
    """scipy's integers as the samples they stand for (8-bit WAV is unsigned)."""
    if raw.dtype == np.uint8:
        return (raw.astype(np.float64) - 128) / 128
    if raw.dtype.kind == "i":
        return raw.astype(np.float64) / 2.0 ** (8 * raw.dtype.itemsize - 1)
    return raw.astype(np.float64)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("channels", [1, 2])
def test_scipys_files_decode_as_scipy_reads_them(dtype: str, channels: int) -> None:
    sig = _signal(channels=channels)
    if dtype == "uint8":
        data = np.round(sig * 127 + 128).astype(np.uint8)
    elif dtype.startswith("int"):
        data = np.round(sig * (2 ** (8 * np.dtype(dtype).itemsize - 1) - 1)).astype(dtype)
    else:
        data = sig.astype(dtype)
    raw = _scipy(data)
    clip = read_wav(raw)
    rate, back = scipy.io.wavfile.read(io.BytesIO(raw))
    assert clip.sample_rate == rate == RATE and clip.channels == channels
    want = _scaled(back.reshape(-1, channels)).mean(axis=1)
    assert clip.samples.dtype == np.float64
    np.testing.assert_array_equal(clip.samples, want)  # the same numbers, averaged to mono


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize(("container", "channels"), [("WAV", 1), ("WAVEX", 1), ("WAVEX", 3)])
def test_libsndfiles_files_plain_and_extensible_decode_as_it_reads_them(
    subtype: str, container: str, channels: int
) -> None:
    """WAVE_FORMAT_EXTENSIBLE, which recorders write for more than two channels or 24 bits,
    and 24-bit samples (a common recording format, which scipy cannot write)."""
    raw = _soundfile(_signal(channels=channels), subtype, container)
    tag = struct.unpack_from("<H", raw, 20)[0]
    assert tag == (0xFFFE if container == "WAVEX" else 3 if subtype in ("FLOAT", "DOUBLE") else 1)
    back, rate = soundfile.read(io.BytesIO(raw), dtype="float64", always_2d=True)
    clip = read_wav(raw)
    assert clip.sample_rate == rate and clip.channels == channels
    np.testing.assert_allclose(clip.samples, back.mean(axis=1), rtol=0, atol=1e-15)


def _chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def _riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt(tag: int = 1, channels: int = 1, rate: int = RATE, bits: int = 16) -> bytes:
    align = channels * bits // 8
    return _chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits))


def test_chunks_in_any_order_odd_lengths_padded_and_a_cut_trailer_are_read() -> None:
    pcm = struct.pack("<3h", 1000, -2000, 3000)
    raw = _riff(_chunk(b"LIST", b"abc"), _chunk(b"data", pcm), _fmt()) + b"id3 \xff\xff\x00\x00x"
    clip = read_wav(raw)
    np.testing.assert_array_equal(clip.samples, np.array([1000, -2000, 3000]) / 32768)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "the audio is empty"),
        (b"ID3\x04" + bytes(60), "is an MP3 file, not a WAV file"),
        (b"fLaC" + bytes(60), "is a FLAC file"),
        (b"OggS" + bytes(60), "is an Ogg (Vorbis/Opus) file"),
        (b"hello, this is not audio at all", "is not a WAV file (no RIFF/WAVE header)"),
        (_riff(_fmt()), "has no 'data' chunk"),
        (_riff(_chunk(b"data", bytes(4))), "has no 'fmt' chunk"),
        (_riff(_fmt(tag=2), _chunk(b"data", bytes(4))), "format 0x0002 (compressed?)"),
        (_riff(_fmt(bits=12), _chunk(b"data", bytes(4))), "12-bit integer PCM samples"),
        (_riff(_fmt(tag=3, bits=16), _chunk(b"data", bytes(4))), "16-bit float samples"),
        (_riff(_fmt(channels=0), _chunk(b"data", bytes(4))), "declares 0 channels"),
        (_riff(_fmt(rate=0), _chunk(b"data", bytes(4))), "sample rate of 0"),
        (_riff(_fmt(), _chunk(b"data", bytes(3))), "not whole frames of 1 channel(s) of 16"),
        (_riff(_fmt(), _chunk(b"data", b"")), "holds no samples"),
        (_riff(_chunk(b"fmt ", b"\x01\x00"), _chunk(b"data", bytes(4))), "fmt chunk is 2 bytes"),
        (
            _riff(_fmt(tag=3, bits=32), _chunk(b"data", struct.pack("<2f", 0.5, float("nan")))),
            "include NaN or Infinity",
        ),
        (
            _riff(_fmt(), b"data" + struct.pack("<I", 100) + bytes(8)),
            "declares 100 bytes but the file holds 8 after it (the file is cut short)",
        ),
        (
            _riff(_fmt(), b"LIST" + struct.pack("<I", 10**9) + bytes(8)),
            "no 'data' chunk (its 'LIST' chunk declares 1000000000 bytes but 8 remain)",
        ),
        (
            _riff(_fmt(tag=3, bits=64), _chunk(b"data", struct.pack("<2d", 0.5, 1e300))),
            "float samples reach 1e+300; float samples are nominally in [-1, 1]",
        ),
    ],
)
def test_a_malformed_file_is_refused_with_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        read_wav(raw, "instance 2")
    assert err.value.message.startswith("instance 2: ")
    assert says in err.value.message


def test_a_wrong_block_align_is_refused() -> None:
    fmt = _chunk(b"fmt ", struct.pack("<HHIIHH", 1, 2, RATE, RATE * 4, 3, 16))
    with pytest.raises(InvalidInputError, match="block align is 3, not 2 channel"):
        read_wav(_riff(fmt, _chunk(b"data", bytes(8))))


VALID = _scipy(np.round(_signal(64) * 30000).astype(np.int16))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))  # fmt: skip
def test_a_damaged_file_is_read_or_refused_never_anything_else(
    changes: list[tuple[int, int]], keep: int
) -> None:
    """Bytes changed anywhere (the lengths and the format included) and the file cut anywhere:
    read, or refused with InvalidInputError; never another exception, never read past the
    bytes (numpy's frombuffer would say so)."""
    raw = bytearray(VALID[:keep])
    for at, value in changes:
        if at < len(raw):
            raw[at] = value
    try:
        clip = read_wav(bytes(raw))
    except InvalidInputError as exc:
        assert exc.message
    else:
        assert clip.samples.ndim == 1 and clip.samples.size > 0
        assert np.isfinite(clip.samples).all()


def test_a_streamed_files_unset_length_reads_to_the_end() -> None:
    """ffmpeg writing to a pipe cannot go back to write the data length: it leaves 0xFFFFFFFF
    (libsndfile reads such files to their end, and so does this reader)."""
    pcm = struct.pack("<4h", 1, 2, 3, 4)
    raw = _riff(_fmt()) + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm
    raw = raw[:4] + struct.pack("<I", 0xFFFFFFFF) + raw[8:]  # the RIFF's length unset too
    clip = read_wav(raw)
    np.testing.assert_array_equal(clip.samples, np.array([1, 2, 3, 4]) / 32768)
    # With the RIFF's own length set, the samples end there: a chunk after them was read as
    # 17 more samples (review C).
    tagged = _riff(_fmt(), b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm)
    tagged += _chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 4) + b"abcd")
    assert read_wav(tagged).frames == 4
    # An odd data chunk's pad byte up to the RIFF's end is no sample: 3 frames of 24 bits (9
    # bytes) were refused as "not whole frames" (review E).
    pcm24 = bytes(range(1, 10))
    odd = _riff(_fmt(bits=24), b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm24 + b"\0")
    assert read_wav(odd).frames == 3
    # An even block has no pad byte: a byte over whole 16-bit frames is a cut file (review F).
    cut = _riff(_fmt(), b"data" + struct.pack("<I", 0xFFFFFFFF) + bytes(799))
    with pytest.raises(InvalidInputError, match="not whole frames"):
        read_wav(cut)


def test_only_the_frames_a_model_reads_are_decoded() -> None:
    """A model reads a fixed length: a long file's other frames are counted, not decoded (a
    10 MB file of 8-bit samples took 80 MB as float64 to read 4,000 of its samples)."""
    raw = _scipy(np.round(_signal(4000, channels=2) * 30000).astype(np.int16))
    whole, head = read_wav(raw), read_wav(raw, max_frames=300)
    assert whole.frames == head.frames == 4000
    assert head.samples.shape == (300,)
    np.testing.assert_array_equal(head.samples, whole.samples[:300])
