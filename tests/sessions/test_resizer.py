"""The re-packetiser (pure): sizes, renumbering, timestamps and when output
is due, with explicit arrival times."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

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


# ---- byte for byte: rtpproxy's own rtp_resizer (linked from its build into a
# local harness fed these packets and times; after each input, every packet
# rtp_resizer_get() returns at that time) gave these outputs: count of
# output / discarded / passed-through packets, and a digest of the whole
# sequence ("OUT <hex>", "DISC", "PASS" lines).
def _rtp2(seq, ts, payload, pt=0, m=False, ssrc=0x42):
    return struct.pack("!BBHII", 0x80, pt | (0x80 if m else 0), seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def _scenarios():
    rnd = random.Random(11)
    t0 = 5000.0
    out = {}
    pay = lambda n: bytes(rnd.randrange(256) for _ in range(n))
    out["pcmu 10->20"] = (20, [(t0 + i * 0.01, _rtp2(i, i * 80, pay(80), m=(i == 0))) for i in range(40)])
    out["pcmu 20->30"] = (30, [(t0 + i * 0.02, _rtp2(i, i * 160, pay(160))) for i in range(40)])
    out["pcmu 30->10"] = (10, [(t0 + i * 0.03, _rtp2(i, i * 240, pay(240), m=(i == 0))) for i in range(20)])
    out["pcma 20->50 jitter"] = (
        50,
        [(t0 + i * 0.02 + rnd.uniform(0, 0.03), _rtp2(i, i * 160, pay(160), pt=8)) for i in range(60)],
    )
    pk = [
        (t0 + i * 0.02 + rnd.uniform(0, 0.06), _rtp2(i, i * 160, pay(160)))
        for i in range(80)
        if rnd.random() > 0.1
    ]
    pk.sort(key=lambda x: x[0])
    out["pcmu 20->40 loss reorder"] = (40, pk)
    out["g729 10->30"] = (30, [(t0 + i * 0.01, _rtp2(i, i * 80, pay(10), pt=18)) for i in range(60)])
    out["g729 20->10 sid"] = (
        10,
        [(t0 + i * 0.02, _rtp2(i, i * 160, pay(20 if i % 7 else 22), pt=18)) for i in range(30)],
    )
    out["gsm 20->60"] = (60, [(t0 + i * 0.02, _rtp2(i, i * 160, pay(33), pt=3)) for i in range(40)])
    out["gsm 60->20"] = (20, [(t0 + i * 0.06, _rtp2(i, i * 480, pay(99), pt=3)) for i in range(15)])
    out["g723 30->60"] = (
        60,
        [(t0 + i * 0.03, _rtp2(i, i * 240, b"\x00" + pay(23), pt=4)) for i in range(20)],
    )
    out["g722 20->40"] = (40, [(t0 + i * 0.02, _rtp2(i, i * 160, pay(160), pt=9)) for i in range(30)])
    out["dtmf mixed"] = (
        20,
        [
            (t0 + i * 0.01, _rtp2(i, i * 80, pay(80) if i % 5 else pay(4), pt=0 if i % 5 else 101))
            for i in range(40)
        ],
    )
    out["late and ssrc change"] = (
        20,
        [(t0 + i * 0.01, _rtp2(i, i * 80, pay(80), ssrc=1 if i < 20 else 2)) for i in range(40)]
        + [(t0 + 0.5, _rtp2(3, 3 * 80, pay(80), ssrc=2))],
    )
    out["stall then burst"] = (
        20,
        [(t0 + (i if i < 10 else i + 20) * 0.01, _rtp2(i, i * 80, pay(80))) for i in range(30)],
    )
    out["pt change"] = (
        40,
        [(t0 + i * 0.02, _rtp2(i, i * 160, pay(160), pt=0 if i < 7 else 8)) for i in range(20)],
    )
    return out


HARNESS = {
    "pcmu 10->20": (20, 0, 0, "0f7696a58f0b3efb"),
    "pcmu 20->30": (26, 0, 0, "2c9444e28268c5fa"),
    "pcmu 30->10": (60, 0, 0, "8dc801b4d75c5f24"),
    "pcma 20->50 jitter": (24, 0, 0, "4ff4d13d9a339e59"),
    "pcmu 20->40 loss reorder": (45, 2, 0, "ac53621039dc59e7"),
    "g729 10->30": (20, 0, 0, "3475db46f64ca2e2"),
    "g729 20->10 sid": (55, 5, 0, "7dbdbf3e99add889"),
    "gsm 20->60": (13, 0, 0, "709b4428c80804a0"),
    "gsm 60->20": (45, 0, 0, "497f30242b3184d7"),
    "g723 30->60": (10, 0, 0, "7075f962c0518a2d"),
    "g722 20->40": (15, 0, 0, "6a500903bd568c49"),
    "dtmf mixed": (16, 0, 8, "210553777f18e3c7"),
    "late and ssrc change": (20, 1, 0, "c82f83b2ad855444"),
    "stall then burst": (25, 0, 0, "202df4d025a61b51"),
    "pt change": (10, 0, 0, "12254d835699e744"),
}


@pytest.mark.parametrize("name", sorted(HARNESS))
def test_output_matches_rtpproxy_byte_for_byte(name):
    ptime, pkts = _scenarios()[name]
    rs = Resizer(ptime)
    lines = []
    for t, p in pkts:
        r = rs.enqueue(p, t)
        if r == NOT_TAKEN:
            lines.append("PASS")
        elif r == DISCARDED:
            lines.append("DISC")
        while (o := rs.get(t)) is not None:
            lines.append("OUT " + o.hex())
    nout = sum(1 for x in lines if x.startswith("OUT"))
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    assert (nout, lines.count("DISC"), lines.count("PASS"), digest) == HARNESS[name]
