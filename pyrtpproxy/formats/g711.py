"""G.711 (PCMU / PCMA) in pure Python, table driven.

Decoding maps each 8-bit code to a 16-bit linear sample through two
``bytes.translate`` tables (low and high byte), so a whole payload decodes
at C speed with no Python loop.  Encoding indexes a 65536-entry table by the
unsigned 16-bit sample.  The tables follow the classic reference algorithm
(the one libraries such as the late ``audioop`` module used): u-law works on
the top 14 bits of a sample, A-law on the top 13.

Linear audio is signed 16-bit little-endian PCM (what WAV files hold).
"""

from __future__ import annotations

import array
import functools
import sys
from collections.abc import Callable, Iterable

PT_PCMU = 0
PT_PCMA = 8

_BIG_ENDIAN = sys.byteorder == "big"


# ---- the reference algorithm, used once to build the tables --------------------
def _ulaw_to_linear(code: int) -> int:
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def _alaw_to_linear(code: int) -> int:
    a = code ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


_SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for i, end in enumerate(ends):
        if value <= end:
            return i
    return len(ends)


def _linear14_to_ulaw(v: int) -> int:
    """``v`` is a sample's top 14 bits (sample >> 2)."""
    if v < 0:
        v, mask = -v, 0x7F
    else:
        mask = 0xFF
    v = min(v, 8159) + 33
    seg = _segment(v, _SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((v >> (seg + 1)) & 0x0F)) ^ mask


def _linear13_to_alaw(v: int) -> int:
    """``v`` is a sample's top 13 bits (sample >> 3)."""
    if v >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        v = -v - 1
    seg = _segment(v, _SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= ((v >> 1) if seg < 2 else (v >> seg)) & 0x0F
    return aval ^ mask


# ---- tables ------------------------------------------------------------------------
ULAW_TO_LINEAR: tuple[int, ...] = tuple(_ulaw_to_linear(c) for c in range(256))
ALAW_TO_LINEAR: tuple[int, ...] = tuple(_alaw_to_linear(c) for c in range(256))


def _split(table: tuple[int, ...]) -> tuple[bytes, bytes]:
    lo = bytes(v & 0xFF for v in table)
    hi = bytes((v >> 8) & 0xFF for v in table)
    return lo, hi


_ULAW_LO, _ULAW_HI = _split(ULAW_TO_LINEAR)
_ALAW_LO, _ALAW_HI = _split(ALAW_TO_LINEAR)


@functools.cache
def _ulaw_encode_table() -> bytes:
    t14 = [_linear14_to_ulaw(v) for v in range(-8192, 8192)]
    # index: unsigned 16-bit sample; value: code of (signed sample >> 2)
    return bytes(t14[((s - 65536 if s & 0x8000 else s) >> 2) + 8192] for s in range(65536))


@functools.cache
def _alaw_encode_table() -> bytes:
    t13 = [_linear13_to_alaw(v) for v in range(-4096, 4096)]
    return bytes(t13[((s - 65536 if s & 0x8000 else s) >> 3) + 4096] for s in range(65536))


# ---- whole buffers ---------------------------------------------------------------
def _decode(data: bytes, lo: bytes, hi: bytes) -> bytes:
    data = bytes(data)
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(lo)
    out[1::2] = data.translate(hi)
    return bytes(out)


def ulaw_decode(data: bytes) -> bytes:
    """PCMU payload -> signed 16-bit little-endian PCM."""
    return _decode(data, _ULAW_LO, _ULAW_HI)


def alaw_decode(data: bytes) -> bytes:
    """PCMA payload -> signed 16-bit little-endian PCM."""
    return _decode(data, _ALAW_LO, _ALAW_HI)


def _encode(pcm: bytes, table: bytes) -> bytes:
    if len(pcm) % 2:
        raise ValueError("16-bit PCM needs an even number of bytes")
    samples = array.array("H")
    samples.frombytes(pcm)
    if _BIG_ENDIAN:  # pragma: no cover - exercised on big-endian hosts only
        samples.byteswap()
    return bytes(map(table.__getitem__, samples))


def ulaw_encode(pcm: bytes) -> bytes:
    """Signed 16-bit little-endian PCM -> PCMU payload."""
    return _encode(pcm, _ulaw_encode_table())


def alaw_encode(pcm: bytes) -> bytes:
    """Signed 16-bit little-endian PCM -> PCMA payload."""
    return _encode(pcm, _alaw_encode_table())


# ---- single samples and sequences ---------------------------------------------------
def linear_to_ulaw(sample: int) -> int:
    return _ulaw_encode_table()[sample & 0xFFFF]


def linear_to_alaw(sample: int) -> int:
    return _alaw_encode_table()[sample & 0xFFFF]


def samples_to_pcm(samples: Iterable[int]) -> bytes:
    """Signed ints (clipped to 16 bits) -> little-endian PCM bytes."""
    a = array.array("h", (max(-32768, min(32767, int(s))) for s in samples))
    if _BIG_ENDIAN:  # pragma: no cover
        a.byteswap()
    return a.tobytes()


def pcm_to_samples(pcm: bytes) -> list[int]:
    a = array.array("h")
    a.frombytes(pcm)
    if _BIG_ENDIAN:  # pragma: no cover
        a.byteswap()
    return a.tolist()


# ---- by RTP payload type ------------------------------------------------------------
DECODERS: dict[int, Callable[[bytes], bytes]] = {PT_PCMU: ulaw_decode, PT_PCMA: alaw_decode}
ENCODERS: dict[int, Callable[[bytes], bytes]] = {PT_PCMU: ulaw_encode, PT_PCMA: alaw_encode}
SILENCE: dict[int, int] = {PT_PCMU: 0xFF, PT_PCMA: 0xD5}  # the codes of sample 0


def decode(pt: int, payload: bytes) -> bytes:
    """Decode a G.711 payload of static payload type ``pt`` (0 or 8)."""
    try:
        return DECODERS[pt](payload)
    except KeyError:
        raise ValueError(f"payload type {pt} is not G.711") from None


def encode(pt: int, pcm: bytes) -> bytes:
    """Encode 16-bit PCM for static payload type ``pt`` (0 or 8)."""
    try:
        return ENCODERS[pt](pcm)
    except KeyError:
        raise ValueError(f"payload type {pt} is not G.711") from None


__all__ = [
    "ALAW_TO_LINEAR",
    "DECODERS",
    "ENCODERS",
    "PT_PCMA",
    "PT_PCMU",
    "SILENCE",
    "ULAW_TO_LINEAR",
    "alaw_decode",
    "alaw_encode",
    "decode",
    "encode",
    "linear_to_alaw",
    "linear_to_ulaw",
    "pcm_to_samples",
    "samples_to_pcm",
    "ulaw_decode",
    "ulaw_encode",
]
