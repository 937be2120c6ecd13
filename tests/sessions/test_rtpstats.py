"""The RTP analyser (pure): counters as rtpproxy 3.2 computes them.

The expected counters are what the real rtpproxy answered to Q on the same
packets (bench/rtpa_compare.py, run against rtpproxy 3.2.0.66bdfeab)."""

from __future__ import annotations

import struct

import pytest

from pyrtpproxy.sessions.rtpstats import UPDATE_SSRC_CHG, RtpAnalyzer, calc_samples, parse_rtp


def rtp(
    seq: int, ts: int | None = None, ssrc: int = 0x1234, pt: int = 0, m: bool = False, payload=b"\xd5" * 160
):
    ts = seq * 160 if ts is None else ts
    return struct.pack("!BBHII", 0x80, pt | (0x80 if m else 0), seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def feed(pkts, step=0.02, t0=100.0) -> RtpAnalyzer:
    an = RtpAnalyzer()
    for i, p in enumerate(pkts):
        an.update(p, t0 + i * step)
    return an


def counters(an: RtpAnalyzer) -> tuple[int, int, int, int, int]:
    r = an.stats()
    return r.nsent, r.nrcvd, r.ndups, r.nlost, r.perrs


# (name, packets, (nsent, nrcvd, ndups, nlost, perrs) answered by rtpproxy)
CASES = [
    ("in order", [rtp(s) for s in range(100, 150)], (50, 50, 0, 0, 0)),
    ("loss", [rtp(s) for s in range(200, 260) if s % 7 != 3], (60, 52, 0, 8, 0)),
    ("duplicates", [rtp(s) for s in (200, 201, 201, 202, 203, 203, 203, 204, 205)], (6, 6, 3, 0, 0)),
    ("reorder", [rtp(s) for s in (300, 302, 301, 303, 305, 304, 306, 309, 307, 308, 310)], (11, 11, 0, 0, 0)),
    ("reorder below start", [rtp(s) for s in (400, 398, 399, 401, 397, 402)], (6, 6, 0, 0, 0)),
    ("wrap", [rtp(65530 + i) for i in range(12)], (12, 12, 0, 0, 0)),
    ("pre-wrap after wrap", [rtp(s) for s in (65533, 65534, 65535, 0, 1, 65532, 2, 3)], (7, 7, 0, 0, 0)),
    ("desync jump", [rtp(s) for s in (10, 11, 12, 2000, 2001, 2002)], (6, 6, 0, 0, 0)),
    (
        "ssrc change",
        [rtp(s) for s in range(50, 60)] + [rtp(s, ssrc=0x9999) for s in range(7000, 7010)],
        (20, 20, 0, 0, 0),
    ),
    (
        "marker seq reset",
        [rtp(s) for s in range(500, 510)] + [rtp(s, m=(s == 20)) for s in range(20, 30)],
        (20, 20, 0, 0, 0),
    ),
    (
        "parse errors",
        [rtp(s) for s in range(600, 605)]
        + [b"\x80\x00\x01", b"\x40" + b"\x00" * 20, b"\x81\xc8" + b"\x00" * 30]
        + [rtp(s) for s in range(605, 610)],
        (10, 10, 0, 0, 3),
    ),
    (
        "loss with dups and reorder",
        [rtp(s) for s in (200, 201, 202, 203, 203, 206, 205, 208, 209)],
        (10, 8, 1, 2, 0),
    ),
]


@pytest.mark.parametrize("name,pkts,want", CASES, ids=[c[0] for c in CASES])
def test_counters_match_rtpproxy(name, pkts, want):
    assert counters(feed(pkts)) == want


def test_nothing_seen():
    an = RtpAnalyzer()
    r = an.stats()
    assert (r.nsent, r.nrcvd, r.nlost, r.longest_ipi, r.jlast, r.jmax, r.javg) == (
        0,
        0,
        0,
        0.0,
        0.0,
        0.0,
        0.0,
    )


def test_ssrc_change_is_reported():
    an = RtpAnalyzer()
    assert an.update(rtp(1), 1.0) == 0
    assert an.update(rtp(2, ssrc=7), 1.02) == UPDATE_SSRC_CHG
    assert an.stats().ssrc_changes == 2 and an.stats().last_ssrc == 7


def test_jitter_rfc3550_style_in_timestamp_units():
    # on time: no jitter; one packet 5 ms late (40 units at 8 kHz)
    an = RtpAnalyzer()
    t = 10.0
    for s in range(10):
        an.update(rtp(s), t + s * 0.02)
    assert an.stats().jlast == 0.0
    an.update(rtp(10), t + 10 * 0.02 + 0.005)
    assert an.stats().jlast == pytest.approx(2.5)
    an.update(rtp(11), t + 11 * 0.02)
    r = an.stats()
    assert r.jlast == pytest.approx(2.5 + (40 - 2.5) / 16, abs=0.07)
    assert r.jmax == pytest.approx(r.jlast)
    assert r.javg == pytest.approx((2.5 + r.jlast) / 11, abs=0.01)
    assert r.longest_ipi == pytest.approx(0.025)


def test_duplicate_timestamps_do_not_count_for_jitter():
    an = RtpAnalyzer()
    an.update(rtp(1), 1.0)
    an.update(rtp(2), 1.02)
    an.update(rtp(3, ts=2 * 160), 1.5)  # same timestamp as seq 2: skipped
    assert an.stats().jmax == 0.0


def test_parse_rules():
    assert parse_rtp(b"\x80\x00" + b"\x00" * 9) is None  # short
    assert parse_rtp(b"\x40" + b"\x00" * 20) is None  # version 1
    assert parse_rtp(b"\x81\xc9" + b"\x00" * 20) is None  # RTCP on the RTP port
    assert parse_rtp(b"\x90\x00" + b"\x00" * 10 + b"\x00\x00\x00\x05") is None  # extension past the end
    assert parse_rtp(b"\xa0\x00" + b"\x00" * 10 + b"\x01\x00") is None  # padding 0
    info = parse_rtp(b"\xa0\x00" + b"\x00" * 10 + b"\x11\x22\x02")
    assert info is not None and info.data_size == 1
    info = parse_rtp(rtp(5, pt=18, payload=b"\x00" * 22))
    assert info is not None and info.nsamples == 240 and not info.appendable
    assert calc_samples(3, b"\x00" * 66) == 320
    assert calc_samples(4, b"\x00" * 24 + b"\x01" * 20) == 480
    assert calc_samples(4, b"\x03") == -1
    assert calc_samples(101, b"\x00" * 4) == -1
