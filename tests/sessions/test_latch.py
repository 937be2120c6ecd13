"""Latching rules (spec section 6) with an explicit clock and fake packets."""

import struct

from pyrtpproxy.sessions import latch
from pyrtpproxy.sessions.session import Session

A = ("127.0.0.1", 30000)
NAT = ("127.0.0.1", 32000)
EVIL = ("127.0.0.9", 40000)


def rtp(ssrc=0xAAAA, seq=1):
    return bytearray(struct.pack("!BBHII", 0x80, 0, seq, 160, ssrc) + b"\xff" * 160)


def stream(now=0.0):
    s = Session.new("c", "f", now, 60)
    return s.rtp[1]


def test_first_packet_latches_and_guesses_rtcp():
    st = stream()
    p = rtp()
    assert latch.accept(st, NAT, p, len(p), 100.0) == latch.ACCEPT
    assert st.remote == NAT and st.latched and st.untrusted
    assert st.ssrc == 0xAAAA and st.seq == 1
    assert st.rtcp_twin.remote == ("127.0.0.1", 32001)


def test_prefill_then_nat_source_is_learned():
    st = stream()
    latch.prefill(st, ("10.1.2.3", 4000), 0.0)
    assert st.remote == ("10.1.2.3", 4000) and not st.latched
    p = rtp()
    assert latch.accept(st, NAT, p, len(p), 100.0) == latch.ACCEPT
    assert st.remote == NAT and st.latched


def test_learned_address_wins_over_reinvite_prefill():
    st = stream()
    p = rtp()
    latch.accept(st, NAT, p, len(p), 100.0)
    latch.prefill(st, ("127.0.0.1", 32010), 150.0)
    assert st.remote == NAT


def test_stranger_dropped_once_latched():
    st = stream()
    p = rtp()
    latch.accept(st, NAT, p, len(p), 100.0)
    q = rtp(ssrc=0xBBBB, seq=500)
    assert latch.accept(st, EVIL, q, len(q), 200.0) == latch.DROP
    assert st.remote == NAT


def test_same_ssrc_within_window_relatches():
    st = stream()
    p = rtp(seq=10)
    latch.accept(st, NAT, p, len(p), 100.0)
    moved = ("127.0.0.1", 32002)
    q = rtp(seq=11)
    assert latch.accept(st, moved, q, len(q), 200.0) == latch.ACCEPT
    assert st.remote == moved


def test_same_ssrc_far_seq_dropped():
    st = stream()
    p = rtp(seq=10)
    latch.accept(st, NAT, p, len(p), 100.0)
    q = rtp(seq=10 + 1000)
    assert latch.accept(st, ("127.0.0.1", 32002), q, len(q), 200.0) == latch.DROP


def test_update_window_allows_relatch():
    st = stream()
    p = rtp()
    latch.accept(st, NAT, p, len(p), 100.0)
    latch.prefill(st, ("127.0.0.1", 1), 195.0)
    q = rtp(ssrc=0xCCCC)
    assert latch.accept(st, EVIL, q, len(q), 200.0) == latch.ACCEPT
    q2 = rtp(ssrc=0xDDDD)
    assert latch.accept(st, NAT, q2, len(q2), 206.0) == latch.DROP


def test_non_rtp_does_not_latch():
    st = stream()
    latch.prefill(st, A, 0.0)
    junk = bytearray(b"hello")
    assert latch.accept(st, A, junk, len(junk), 100.0) == latch.ACCEPT
    assert not st.latched


def test_asymmetric_accepts_same_host_any_port_never_learns():
    st = stream()
    st.asymmetric = True
    st.latched = True
    latch.prefill(st, ("127.0.0.1", 33000), 0.0)
    p = rtp()
    assert latch.accept(st, ("127.0.0.1", 32000), p, len(p), 100.0) == latch.ACCEPT
    assert st.remote == ("127.0.0.1", 33000)
    assert latch.accept(st, EVIL, p, len(p), 100.0) == latch.DROP


def test_rtcp_never_relatches_by_ssrc():
    s = Session.new("c", "f", 0.0, 60)
    st = s.rtcp[1]
    p = rtp()
    latch.accept(st, NAT, p, len(p), 100.0)
    assert latch.accept(st, ("127.0.0.1", 1), p, len(p), 200.0) == latch.DROP


def test_first_prefill_opens_no_update_window():
    # rtpproxy opens the window only when a U/L refills a stream that
    # already has an address: a fresh call is not open to strangers.
    st = stream()
    latch.prefill(st, A, 100.0)
    p = rtp()
    assert latch.accept(st, A, p, len(p), 100.5) == latch.ACCEPT
    q = rtp(ssrc=0xEEEE, seq=7)
    assert latch.accept(st, EVIL, q, len(q), 101.0) == latch.DROP
    assert st.remote == A


def test_refill_opens_update_window_hold_does_not():
    st = stream()
    latch.prefill(st, A, 100.0)
    p = rtp()
    latch.accept(st, A, p, len(p), 100.5)
    latch.prefill(st, None, 150.0)  # hold: no window
    q = rtp(ssrc=0xEEEE, seq=7)
    assert latch.accept(st, EVIL, q, len(q), 151.0) == latch.DROP
    latch.prefill(st, A, 160.0)  # re-INVITE refill: window
    assert latch.accept(st, NAT, q, len(q), 161.0) == latch.ACCEPT
    assert st.remote == NAT
