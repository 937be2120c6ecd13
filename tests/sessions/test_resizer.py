"""The re-packetiser (pure): sizes, renumbering, timestamps and when output
is due, with explicit arrival times."""

from __future__ import annotations

import struct

from pyrtpproxy.sessions.resizer import DISCARDED, NOT_TAKEN, TAKEN, Resizer


def rtp(seq, ts, payload, pt=0, m=False, ssrc=0x42):
    return struct.pack("!BBHII", 0x80, pt | (0x80 if m else 0), seq, ts, ssrc) + payload


def hdr(p):
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", p[:12])
    return len(p) - 12, b1 & 0x7F, bool(b1 & 0x80), seq, ts


def drain(rs, now):
    out = []
    while (p := rs.get(now)) is not None:
        out.append(p)
    return out


def test_join_to_20ms():
    rs = Resizer(20)
    assert rs.enqueue(rtp(7, 800, b"\x01" * 80, m=True), 1.0) == TAKEN
    assert drain(rs, 1.0) == []  # 10 ms queued: not enough yet
    assert rs.enqueue(rtp(8, 880, b"\x02" * 80), 1.01) == TAKEN
    (p,) = drain(rs, 1.01)
    assert hdr(p) == (160, 0, True, 7, 800)  # first packet's header, renumbered from its seq
    assert p[12:] == b"\x01" * 80 + b"\x02" * 80
    for i, s in enumerate(range(9, 13)):
        rs.enqueue(rtp(s, 800 + 80 * (i + 2), b"\x03" * 80), 1.02 + i * 0.01)
    assert [hdr(p)[3:] for p in drain(rs, 1.06)] == [(8, 960), (9, 1120)]


def test_split_30ms_into_10ms_keeps_marker_on_first_only():
    rs = Resizer(10)
    rs.enqueue(rtp(100, 5000, bytes(range(240)), m=True), 2.0)
    out = drain(rs, 2.0)
    assert [hdr(p) for p in out] == [
        (80, 0, True, 100, 5000),
        (80, 0, False, 101, 5080),
        (80, 0, False, 102, 5160),
    ]
    assert b"".join(p[12:] for p in out) == bytes(range(240))


def test_timeout_sends_what_is_queued():
    # one 10 ms packet waiting for a second: it leaves alone once the
    # stream's clock is two output periods (320 samples, 40 ms) past it,
    # less the 40-sample head start: 35 ms after its arrival
    rs = Resizer(20)
    rs.enqueue(rtp(1, 8000, b"\x00" * 80), 5.0)
    assert rs.get(5.034) is None
    p = rs.get(5.0351)
    assert p is not None and hdr(p)[0] == 80


def test_late_packet_is_discarded_other_codecs_pass():
    rs = Resizer(20)
    rs.enqueue(rtp(1, 0, b"\x00" * 80), 1.0)
    rs.enqueue(rtp(2, 80, b"\x00" * 80), 1.01)
    assert len(drain(rs, 1.01)) == 1
    assert rs.enqueue(rtp(0, 65536 * 65536 - 80, b"\x00" * 80), 1.02) == DISCARDED  # before ts 0
    assert rs.enqueue(rtp(3, 160, b"\x01\x02\x03\x04", pt=101), 1.02) == NOT_TAKEN
    assert rs.enqueue(rtp(3, 160, b""), 1.02) == NOT_TAKEN  # no payload


def test_hole_or_payload_change_ends_a_packet():
    rs = Resizer(40)
    rs.enqueue(rtp(1, 0, b"\x00" * 160), 1.0)
    rs.enqueue(rtp(3, 320, b"\x00" * 160), 1.04)  # seq 2 lost: a hole in time
    out = drain(rs, 1.04)
    assert [hdr(p)[:5:4] for p in out] == [(160, 0)]  # not joined across the hole
    assert drain(rs, 1.11) == []  # the rest waits for more, or for its time
    out = drain(rs, 1.12)
    assert [hdr(p)[3:] for p in out] == [(2, 320)]  # renumbered without the gap


def test_gsm_and_g729_frame_boundaries():
    rs = Resizer(10)  # GSM's minimum is 20 ms: rounded up
    rs.enqueue(rtp(1, 0, b"\x00" * 66, pt=3), 1.0)
    out = drain(rs, 1.0)
    assert [hdr(p)[0] for p in out] == [33, 33]
    rs = Resizer(30)
    for s in range(3):
        rs.enqueue(rtp(s, s * 80, b"\x05" * 10, pt=18), 1.0 + s * 0.01)
    (p,) = drain(rs, 1.02)
    assert hdr(p)[:2] == (30, 18)


def test_set_ptime_and_ssrc_change():
    rs = Resizer(20)
    assert rs.ptime == 20
    rs.set_ptime(60)
    assert rs.ptime == 60 and rs.max_buf_nsamples == 960
    rs.enqueue(rtp(1, 0, b"\x00" * 160), 1.0)
    rs.enqueue(rtp(9, 999999, b"\x00" * 160, ssrc=7), 1.02)  # new source: starts afresh
    assert len(rs) == 2
