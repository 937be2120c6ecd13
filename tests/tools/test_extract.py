"""G.711 tables, and recordings turned into WAV files (pyrtpproxy-extract)."""

from __future__ import annotations

import array
import math
import subprocess
import sys
import warnings
import wave

import pytest
from relayutil import Peer, port_of, rtp_packet

from pyrtpproxy.formats import g711, recfmt
from pyrtpproxy.tools import extract

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # removed in Python 3.13: only a cross-check here
    except ImportError:  # pragma: no cover
        audioop = None

T0 = 1700000000.0


# ---- G.711 -------------------------------------------------------------------------------
def test_g711_known_values():
    assert g711.ULAW_TO_LINEAR[0xFF] == 0 and g711.ULAW_TO_LINEAR[0x00] == -32124
    assert g711.ULAW_TO_LINEAR[0x80] == 32124 and g711.ULAW_TO_LINEAR[0x7F] == 0
    assert g711.ALAW_TO_LINEAR[0xD5] == 8 and g711.ALAW_TO_LINEAR[0x55] == -8
    assert g711.ALAW_TO_LINEAR[0xAA] == 32256 and g711.ALAW_TO_LINEAR[0x2A] == -32256
    assert g711.linear_to_ulaw(0) == 0xFF and g711.linear_to_alaw(0) == 0xD5
    assert g711.SILENCE == {0: 0xFF, 8: 0xD5}
    assert g711.linear_to_ulaw(32767) == 0x80 and g711.linear_to_ulaw(-32768) == 0x00


def test_g711_round_trip_of_every_code():
    for code in range(256):
        lin = g711.ULAW_TO_LINEAR[code]
        assert g711.linear_to_ulaw(lin) == (0xFF if code == 0x7F else code)
        assert g711.linear_to_alaw(g711.ALAW_TO_LINEAR[code]) == code
    codes = bytes(range(256))
    assert g711.alaw_encode(g711.alaw_decode(codes)) == codes
    pcm = g711.ulaw_decode(codes)
    assert g711.pcm_to_samples(pcm) == list(g711.ULAW_TO_LINEAR)


@pytest.mark.skipif(audioop is None, reason="no audioop to compare with")
def test_g711_matches_audioop_on_every_sample():
    codes = bytes(range(256))
    assert g711.ulaw_decode(codes) == audioop.ulaw2lin(codes, 2)
    assert g711.alaw_decode(codes) == audioop.alaw2lin(codes, 2)
    every = g711.samples_to_pcm(range(-32768, 32768))
    assert g711.ulaw_encode(every) == audioop.lin2ulaw(every, 2)
    assert g711.alaw_encode(every) == audioop.lin2alaw(every, 2)


def test_g711_by_payload_type():
    pcm = g711.samples_to_pcm([0, 1000, -1000, 32767])
    assert g711.decode(0, g711.encode(0, pcm)) == g711.ulaw_decode(g711.ulaw_encode(pcm))
    assert g711.decode(8, g711.encode(8, pcm)) == g711.alaw_decode(g711.alaw_encode(pcm))
    with pytest.raises(ValueError):
        g711.decode(18, b"x")
    with pytest.raises(ValueError):
        g711.encode(0, b"odd")


# ---- helpers ----------------------------------------------------------------------------------
def tone(freq: float, n: int, start: int = 0, amp: int = 8000) -> list[int]:
    return [int(amp * math.sin(2 * math.pi * freq * (start + i) / 8000)) for i in range(n)]


def encoded(pt: int, samples: list[int]) -> bytes:
    return g711.encode(pt, g711.samples_to_pcm(samples))


def decoded(pt: int, payload: bytes) -> list[int]:
    return g711.pcm_to_samples(g711.decode(pt, payload))


def write_adhoc(path, items) -> None:
    """items: (src, time, packet)."""
    with open(path, "wb") as f:
        for src, t, pkt in items:
            f.write(recfmt.adhoc_record(src, t, pkt))


def read_wav(path) -> tuple[int, list[int]]:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 8000 and w.getsampwidth() == 2
        nch = w.getnchannels()
        a = array.array("h")
        a.frombytes(w.readframes(w.getnframes()))
    return nch, a.tolist()


def packets(pt, ssrc, samples, t0, first_seq=0, ptime=160, skip=(), ts0=1000):
    """RTP packets of ``samples`` (ptime samples each), arriving 20 ms apart."""
    out = []
    for k in range(len(samples) // ptime):
        if k in skip:
            continue
        payload = encoded(pt, samples[k * ptime : (k + 1) * ptime])
        pkt = rtp_packet(ssrc, first_seq + k, payload, pt=pt, ts=ts0 + k * ptime)
        out.append((("127.0.0.1", 4000 + pt), t0 + k * 0.02, pkt))
    return out


# ---- extraction from files -------------------------------------------------------------------
def test_stereo_places_packets_by_timestamp_and_fills_gaps(tmp_path):
    a_samples = tone(440, 160 * 10)
    b_samples = tone(1000, 160 * 6, amp=12000)
    a_items = packets(0, 0xA, a_samples, T0, skip={3})  # packet 3 lost
    a_items[4], a_items[5] = a_items[5], a_items[4]  # and two arrive swapped
    a_items.append((("127.0.0.1", 9), T0 + 0.5, bytes([0x80, 201, 0, 1]) + b"\0" * 4))  # RTCP: ignored
    a_items.append((("127.0.0.1", 9), T0 + 0.05, rtp_packet(0xA, 99, b"\x01\x02\x03\x04", pt=101, ts=1000)))
    b_items = packets(8, 0xB, b_samples, T0 + 0.5)  # starts 0.5 s = 4000 samples later
    write_adhoc(tmp_path / "c=f.a.rtp", a_items)
    write_adhoc(tmp_path / "c=f.o.rtp", b_items)
    out = tmp_path / "out.wav"
    assert extract.main(["-s", str(tmp_path / "c=f"), str(out)]) == 0
    nch, s = read_wav(out)
    assert nch == 2
    left, right = s[0::2], s[1::2]
    assert len(left) == 4000 + 160 * 6
    want_a = decoded(0, encoded(0, a_samples))
    for k in range(10):
        seg = left[160 * k : 160 * (k + 1)]
        assert seg == ([0] * 160 if k == 3 else want_a[160 * k : 160 * (k + 1)]), k
    assert left[1600:] == [0] * (len(left) - 1600)
    assert right[:4000] == [0] * 4000
    assert right[4000:] == decoded(8, encoded(8, b_samples))


def test_mono_mixes_both_directions_like_extractaudio(tmp_path):
    a_items = packets(0, 1, tone(300, 480), T0)
    b_items = packets(0, 2, tone(700, 480, amp=-9000), T0)
    write_adhoc(tmp_path / "m.a.rtp", a_items)
    write_adhoc(tmp_path / "m.o.rtp", b_items)
    assert extract.main([str(tmp_path / "m"), str(tmp_path / "m.wav")]) == 0
    nch, s = read_wav(tmp_path / "m.wav")
    da = decoded(0, b"".join(p[12:] for _, _, p in a_items))
    db = decoded(0, b"".join(p[12:] for _, _, p in b_items))
    assert nch == 1
    assert s == [int((x + y) / 2) for x, y in zip(da, db)]  # C's truncating division
    # one file only: that channel as it is
    assert extract.main(["-B", str(tmp_path / "m.o.rtp"), str(tmp_path / "b.wav")]) == 0
    assert read_wav(tmp_path / "b.wav") == (1, db)


def test_new_ssrc_and_timestamp_jump_use_arrival_time(tmp_path):
    first = packets(0, 1, tone(300, 320), T0)
    # the same direction continues with a new SSRC 1 s later, and a bogus timestamp
    second = packets(0, 2, tone(500, 320), T0 + 1.0, ts0=123456789)
    third = [(src, t + 1.0, rtp_packet(2, 50, pkt[12:], ts=999)) for src, t, pkt in second[:1]]  # jump back
    write_adhoc(tmp_path / "j.a.rtp", first + second + third)
    assert extract.main(["-A", str(tmp_path / "j.a.rtp"), str(tmp_path / "j.wav")]) == 0
    _, s = read_wav(tmp_path / "j.wav")
    d2 = decoded(0, b"".join(p[12:] for _, _, p in second))
    assert s[8000 : 8000 + 320] == d2
    assert s[8000 * 2 : 8000 * 2 + 160] == d2[:160]  # placed by its arrival, 1 s after
    assert len(s) == 8000 * 2 + 160


def test_single_pcap_file_with_both_directions(tmp_path):
    a = tone(440, 320)
    b = tone(880, 320)
    path = tmp_path / "c=f.pcap"
    with open(path, "wb") as f:
        f.write(recfmt.pcap_file_header())
        for k in range(2):
            for src, dst, pt, ssrc, samples in (
                (("127.0.0.1", 5000), ("127.0.0.1", 40002), 0, 1, a),
                (("127.0.0.1", 6000), ("127.0.0.1", 40000), 8, 2, b),
            ):
                payload = encoded(pt, samples[160 * k : 160 * (k + 1)])
                f.write(recfmt.pcap_record(src, dst, T0 + 0.02 * k, rtp_packet(ssrc, k, payload, pt=pt), k))
    assert extract.main(["-s", str(path), str(tmp_path / "o.wav")]) == 0
    nch, s = read_wav(tmp_path / "o.wav")
    assert nch == 2
    assert s[0::2] == decoded(0, encoded(0, a)) and s[1::2] == decoded(8, encoded(8, b))


def test_scan_and_errors(tmp_path, capsys):
    write_adhoc(tmp_path / "s.o.rtp", packets(0, 1, tone(300, 480), T0))
    assert extract.main(["-S", str(tmp_path / "s")]) == 1  # s.a.rtp is missing
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path}/s.a.rtp: -1", f"{tmp_path}/s.o.rtp: 3"]
    assert extract.main(["-S", "-B", str(tmp_path / "s.o.rtp")]) == 0
    assert extract.main([str(tmp_path / "nothing"), str(tmp_path / "x.wav")]) == 1
    assert "cannot load neither" in capsys.readouterr().err
    open(tmp_path / "e.a.rtp", "wb").close()
    assert extract.main(["-e", str(tmp_path / "e"), str(tmp_path / "x.wav")]) == 1
    assert "cannot load" in capsys.readouterr().err
    with open(tmp_path / "bad.a.rtp", "wb") as f:
        f.write(b"\x07\x00" + bytes(40))
    assert extract.main(["-A", str(tmp_path / "bad.a.rtp"), str(tmp_path / "x.wav")]) == 1
    with pytest.raises(SystemExit):
        extract.main(["only-one-arg"])


def test_command_line_entry_point(tmp_path):
    write_adhoc(tmp_path / "c.o.rtp", packets(8, 1, tone(300, 480), T0))
    r = subprocess.run(
        [sys.executable, "-m", "pyrtpproxy.tools.extract", str(tmp_path / "c"), str(tmp_path / "c.wav")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "samples decoded" in r.stderr
    assert read_wav(tmp_path / "c.wav")[1] == decoded(8, encoded(8, tone(300, 480)))


# ---- a real relayed call ------------------------------------------------------------------------
@pytest.mark.parametrize("pcap", [False, True])
async def test_recorded_call_decodes_to_what_was_sent(nursery, tmp_path, pcap):
    from test_recording import start

    relay, rec, rd, _ = await start(nursery, tmp_path, pcap=pcap)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U wav 127.0.0.1 {a.port} fA;1"))
    p_for_a = port_of(await relay.cmd(f"L wav 127.0.0.1 {b.port} fA;1 tB;1"))
    assert await relay.cmd("R wav fA tB") == "0" and await relay.cmd("R wav tB fA") == "0"
    a_samples, b_samples = tone(440, 160 * 25), tone(1000, 160 * 25, amp=-10000)
    for k in range(25):
        pa = rtp_packet(0xAAAA, k, encoded(0, a_samples[160 * k : 160 * (k + 1)]), pt=0, ts=7 + 160 * k)
        await a.send(pa, p_for_a)
        assert (await b.recv())[0] == pa
        pb = rtp_packet(0xBBBB, 500 + k, encoded(8, b_samples[160 * k : 160 * (k + 1)]), pt=8, ts=160 * k)
        await b.send(pb, p_for_b)
        assert (await a.recv())[0] == pb
    assert await relay.cmd("D wav fA") == "0"
    await rec.sync()
    base = rd / "wav=fA"
    o, aa = recfmt.read_file(str(base) + ".o.rtp"), recfmt.read_file(str(base) + ".a.rtp")
    assert len(o.packets) == len(aa.packets) == 25
    t_base = min(o.packets[0].time, aa.packets[0].time)
    out = tmp_path / "call.wav"
    assert extract.main(["-s", str(base), str(out)]) == 0
    nch, s = read_wav(out)
    left, right = s[0::2], s[1::2]  # A channel (.a: the callee B), B channel (.o: the caller A)
    off_b = round((aa.packets[0].time - t_base) * 8000)
    off_a = round((o.packets[0].time - t_base) * 8000)
    assert left[off_b : off_b + 4000] == decoded(8, encoded(8, b_samples))
    assert right[off_a : off_a + 4000] == decoded(0, encoded(0, a_samples))
    assert not any(left[:off_b]) and not any(right[:off_a])
