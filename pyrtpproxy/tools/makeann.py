"""``pyrtpproxy-makeann``: make prompt files for ``P`` from audio.

    pyrtpproxy-makeann [-l limit [-L]] [-r] infile [outfile_template]

Like rtpproxy's ``makeann``: reads 8 kHz mono audio and writes
``<template>.0`` (PCMU) and ``<template>.8`` (PCMA), raw codec payload with
no header, the files ``P <call-id> <template> 0,8 ...`` plays.  The template
defaults to ``infile`` itself (as makeann does).

Input: a WAV file (integer PCM, 8000 Hz; several channels are mixed down),
recognised by its RIFF/WAVE header, or else raw 16-bit signed little-endian
8 kHz mono PCM (makeann's only input).  ``-r`` forces raw.

``-l limit``: write at most ``limit`` samples; with ``-L`` the input is
repeated until ``limit`` samples were written.

Only G.711 is made (pure Python); GSM, G.729 and G.722 need codec libraries.
Files are written under a temporary name and renamed into place, so a relay
never reads a half-written prompt.
"""

from __future__ import annotations

import array
import getopt
import io
import os
import sys
import tempfile
import wave

from ..formats import g711

RATE = 8000
PROG = "pyrtpproxy-makeann"
USAGE = f"usage: {PROG} [-l limit [-L]] [-r] infile [outfile_template]\n"


class MakeannError(Exception):
    pass


def _to_int16(frames: bytes, width: int, channels: int) -> bytes:
    """Integer PCM of ``width`` bytes per sample -> mono int16 LE."""
    if width == 1:  # unsigned 8-bit
        vals = [(b - 128) << 8 for b in frames]
    elif width == 2:
        a = array.array("h")
        a.frombytes(frames[: len(frames) // 2 * 2])
        if sys.byteorder == "big":
            a.byteswap()
        vals = a.tolist()
    elif width in (3, 4):
        n = len(frames) // width
        mv = memoryview(frames)
        shift = 8 * (width - 2)
        vals = [
            int.from_bytes(mv[i * width : (i + 1) * width], "little", signed=True) >> shift for i in range(n)
        ]
    else:
        raise MakeannError(f"unsupported WAV sample width: {width} bytes")
    if channels > 1:
        n = len(vals) // channels
        vals = [sum(vals[i * channels : (i + 1) * channels]) // channels for i in range(n)]
    out = array.array("h", vals)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def read_wav(data: bytes) -> bytes:
    """A WAV file's audio as 8 kHz mono int16 LE."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise MakeannError(f"not a usable WAV file ({exc}); integer PCM is required") from None
    if rate != RATE:
        raise MakeannError(
            f"the WAV file is sampled at {rate} Hz; {RATE} Hz is required "
            "(e.g. sox in.wav -r 8000 -c 1 -b 16 out.wav)"
        )
    return _to_int16(frames, width, channels)


def is_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def limit_samples(pcm16: bytes, limit: int | None, loop: bool) -> bytes:
    pcm16 = pcm16[: len(pcm16) // 2 * 2]
    if limit is None:
        return pcm16
    want = 2 * limit
    if loop and pcm16 and len(pcm16) < want:
        pcm16 = pcm16 * (-(-want // len(pcm16)))
    return pcm16[:want]


def encode_prompts(pcm16: bytes) -> dict[int, bytes]:
    """payload type -> prompt file contents."""
    return {0: g711.ulaw_encode(pcm16), 8: g711.alaw_encode(pcm16)}


def _write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".makeann-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def make_prompts(
    infile: str,
    template: str | None = None,
    *,
    limit: int | None = None,
    loop: bool = False,
    raw: bool = False,
) -> list[str]:
    """Read ``infile``, write ``<template>.0`` and ``<template>.8``; return their paths."""
    try:
        with open(infile, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MakeannError(f"can't open {infile} for reading: {exc.strerror}") from None
    pcm = data if raw or not is_wav(data) else read_wav(data)
    pcm = limit_samples(pcm, limit, loop)
    template = infile if template is None else template
    out = []
    for pt, payload in encode_prompts(pcm).items():
        path = f"{template}.{pt}"
        try:
            _write_atomic(path, payload)
        except OSError as exc:
            raise MakeannError(f"can't write {path}: {exc.strerror}") from None
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        opts, rest = getopt.getopt(args, "l:Lr")
    except getopt.GetoptError as exc:
        sys.stderr.write(f"{PROG}: {exc.msg}\n{USAGE}")
        return 1
    limit = None
    loop = raw = False
    for o, v in opts:
        if o == "-l":
            try:
                limit = int(v)
            except ValueError:
                limit = 0
            if limit <= 0:
                sys.stderr.write(f"{PROG}: the limit must be a number greater than zero\n")
                return 1
        elif o == "-L":
            loop = True
        elif o == "-r":
            raw = True
    if not 1 <= len(rest) <= 2:
        sys.stderr.write(USAGE)
        return 1
    if loop and limit is None:
        sys.stderr.write(f"{PROG}: -L needs a limit (-l)\n")
        return 1
    try:
        make_prompts(rest[0], rest[1] if len(rest) == 2 else None, limit=limit, loop=loop, raw=raw)
    except MakeannError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
