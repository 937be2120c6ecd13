"""pyrtpproxy-makeann and the G.711 codec it uses."""

from __future__ import annotations

import array
import math
import subprocess
import sys
import wave

import pytest

from pyrtpproxy.formats import g711
from pyrtpproxy.tools import makeann


def pcm(samples) -> bytes:
    a = array.array("h", samples)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def tone(n=1600, amp=12000):
    return [int(amp * math.sin(2 * math.pi * 440 * i / 8000)) for i in range(n)]


# ---- G.711 ----------------------------------------------------------------------


def test_g711_known_values():
    assert g711.ulaw_encode(pcm([0, -1, 32767, -32768, 1000])) == bytes([0xFF, 0x7E, 0x80, 0x00, 0xCE])
    assert g711.alaw_encode(pcm([0, -1, 32767, -32768, 1000])) == bytes([0xD5, 0x55, 0xAA, 0x2A, 0xFA])
    assert g711.ulaw_decode(bytes([0x00, 0x80, 0xFF])) == pcm([-32124, 32124, 0])
    assert g711.alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])) == pcm([8, -8, 32256, -32256])


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_roundtrip(law):
    enc = getattr(g711, f"{law}_encode")
    dec = getattr(g711, f"{law}_decode")
    # every code decodes to a value that encodes back to the same code
    # (u-law's two zeros both come back as +0)
    codes = bytes(range(256))
    back = enc(dec(codes))
    diff = [(c, b) for c, b in zip(codes, back) if c != b]
    assert diff in ([], [(0x7F, 0xFF)])
    # the quantisation error is bounded by the segment step
    s = list(range(-32768, 32768, 37))
    out = array.array("h")
    out.frombytes(dec(enc(pcm(s))))
    if sys.byteorder == "big":
        out.byteswap()
    for x, y in zip(s, out):
        assert abs(x - y) <= max(16, abs(x) // 16 + 16), (x, y)


def test_g711_matches_makeann_output():
    """Spot values of rtpproxy's makeann tables (sample >> 2 / >> 3 indexed)."""
    s = [-32768, -5000, -100, -4, -3, 0, 3, 4, 100, 5000, 32767]
    assert g711.ulaw_encode(pcm(s)).hex() == "002b727e7efffffef2ab80"
    assert g711.alaw_encode(pcm(s)).hex() == "2a06535555d5d5d5d386aa"


# ---- makeann ----------------------------------------------------------------------


def test_raw_input_like_makeann(tmp_path):
    raw = tmp_path / "ann.raw"
    s = tone()
    raw.write_bytes(pcm(s))
    assert makeann.main([str(raw)]) == 0  # template defaults to the input name
    assert (tmp_path / "ann.raw.0").read_bytes() == g711.ulaw_encode(pcm(s))
    assert (tmp_path / "ann.raw.8").read_bytes() == g711.alaw_encode(pcm(s))
    assert makeann.main([str(raw), str(tmp_path / "p")]) == 0
    assert len((tmp_path / "p.0").read_bytes()) == 1600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.raw", "ann.raw.0", "ann.raw.8", "p.0", "p.8"]


@pytest.mark.parametrize("width,channels", [(2, 1), (1, 1), (2, 2), (3, 1)])
def test_wav_input(tmp_path, width, channels):
    s = tone(800)
    path = tmp_path / "in.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(8000)
        frames = bytearray()
        for v in s:
            if width == 1:
                one = bytes([(v >> 8) + 128])
            else:
                one = (v << (8 * (width - 2))).to_bytes(width, "little", signed=True)
            frames += one * channels
        w.writeframes(bytes(frames))
    assert makeann.main([str(path), str(tmp_path / "w")]) == 0
    out = (tmp_path / "w.0").read_bytes()
    assert len(out) == 800
    if width >= 2:
        assert out == g711.ulaw_encode(pcm(s))
    else:  # 8-bit input loses the low byte
        assert out == g711.ulaw_encode(pcm([(v >> 8) << 8 for v in s]))


def test_wav_wrong_rate_is_refused(tmp_path, capsys):
    path = tmp_path / "hi.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(pcm(tone(100)))
    assert makeann.main([str(path)]) == 1
    assert "8000 Hz is required" in capsys.readouterr().err
    assert not (tmp_path / "hi.wav.0").exists()
    # -r: take the same bytes as raw PCM (header included), as makeann would
    assert makeann.main(["-r", str(path)]) == 0
    assert (tmp_path / "hi.wav.0").stat().st_size == path.stat().st_size // 2


def test_limit_and_loop(tmp_path):
    raw = tmp_path / "a"
    raw.write_bytes(pcm(tone(100)))
    assert makeann.main(["-l", "40", str(raw), str(tmp_path / "short")]) == 0
    assert (tmp_path / "short.8").read_bytes() == g711.alaw_encode(pcm(tone(100)[:40]))
    assert makeann.main(["-l", "250", "-L", str(raw), str(tmp_path / "long")]) == 0
    assert (tmp_path / "long.0").read_bytes() == g711.ulaw_encode(pcm((tone(100) * 3)[:250]))


def test_usage_errors(tmp_path, capsys):
    assert makeann.main([]) == 1
    assert "usage:" in capsys.readouterr().err
    assert makeann.main(["-L", "x"]) == 1
    assert makeann.main(["-l", "0", "x"]) == 1
    assert makeann.main(["-q", "x"]) == 1
    assert makeann.main([str(tmp_path / "missing")]) == 1
    assert "can't open" in capsys.readouterr().err
    assert makeann.main([str(tmp_path / "missing"), str(tmp_path / "no/such/dir/p")]) == 1


def test_write_failure_leaves_nothing(tmp_path, capsys):
    raw = tmp_path / "a"
    raw.write_bytes(pcm(tone(10)))
    assert makeann.main([str(raw), str(tmp_path / "nodir" / "p")]) == 1
    assert "can't write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_module_entry_point(tmp_path):
    raw = tmp_path / "m"
    raw.write_bytes(pcm(tone(80)))
    r = subprocess.run(
        [sys.executable, "-m", "pyrtpproxy.tools.makeann", str(raw)], capture_output=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.0").stat().st_size == 80
