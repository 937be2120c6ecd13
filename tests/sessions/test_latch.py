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


# ---- endpoint-learning policies ----------------------------------------------------
SDP = ("127.0.0.1", 30000)
SAME_HOST = ("127.0.0.1", 31000)
SAME_PORT = ("127.0.0.5", 30000)


def decide(policy, st, src, pkt, now):
    return policy.decider()(st, src, pkt, len(pkt), now)


def test_default_policy_is_rtpproxy_accept():
    assert latch.Policy().decider() is latch.accept
    assert latch.Policy().is_default


def test_unknown_mode_is_refused():
    import pytest

    with pytest.raises(ValueError):
        latch.Policy(learning="sometimes")


def test_immediate_strict_no_ssrc_relatch():
    pol = latch.Policy(strict=True)
    st = stream()
    latch.prefill(st, SDP, 0.0)
    p = rtp(seq=10)
    assert decide(pol, st, SDP, p, 1.0) == latch.ACCEPT and st.latched
    # the victim's SSRC, next seq: rtpproxy would re-latch, strict does not
    q = rtp(seq=11)
    assert decide(pol, st, EVIL, q, 2.0) == latch.DROP
    assert st.remote == SDP
    # a refill opens the window: the phone may move
    latch.prefill(st, SDP, 50.0)
    assert decide(pol, st, NAT, q, 51.0) == latch.ACCEPT and st.remote == NAT
    assert decide(pol, st, EVIL, q, 70.0) == latch.DROP
    assert latch.settled(st, pol, 70.0) and not latch.settled(st, pol, 52.0)


def test_heuristic_sdp_match_latches_at_once_despite_earlier_stranger():
    pol = latch.Policy(learning="heuristic")
    st = stream()
    latch.prefill(st, SDP, 0.0)
    e = rtp(ssrc=0xEEEE)
    assert decide(pol, st, EVIL, e, 1.0) == latch.ACCEPT  # relayed while learning
    assert not st.latched and st.remote == SDP  # replies still go to the SDP
    assert decide(pol, st, SDP, rtp(), 1.1) == latch.ACCEPT
    assert st.latched and st.remote == SDP and st.nlatch == 1
    assert decide(pol, st, EVIL, e, 5.0) == latch.DROP  # non-strict: SSRC differs


def test_heuristic_ranks_when_no_exact_match():
    pol = latch.Policy(learning="heuristic")
    st = stream()
    latch.prefill(st, SDP, 0.0)
    for src in (EVIL, SAME_PORT, SAME_HOST, EVIL):
        decide(pol, st, src, rtp(), 1.0)
    assert not st.latched and st.cand == SAME_HOST
    assert decide(pol, st, EVIL, rtp(), 4.5) == latch.DROP  # window over: latched
    assert st.latched and st.remote == SAME_HOST and st.untrusted
    assert st.rtcp_twin.remote == ("127.0.0.1", 31001)


def test_delayed_latches_to_the_most_recent_source():
    pol = latch.Policy(learning="delayed")
    st = stream()
    latch.prefill(st, SDP, 0.0)
    decide(pol, st, SDP, rtp(), 1.0)
    decide(pol, st, EVIL, rtp(), 2.0)
    assert decide(pol, st, NAT, rtp(), 3.5) == latch.ACCEPT
    assert decide(pol, st, NAT, rtp(), 4.1) == latch.ACCEPT
    assert st.latched and st.remote == NAT


def test_heuristic_strict_refill_relearns_current_address_keeps_ties():
    pol = latch.Policy(learning="heuristic", strict=True)
    st = stream()
    latch.prefill(st, ("10.0.0.1", 4000), 0.0)  # SDP private, phone behind NAT
    decide(pol, st, NAT, rtp(), 1.0)
    decide(pol, st, NAT, rtp(), 4.5)
    assert st.latched and st.remote == NAT
    latch.prefill(st, ("10.0.0.1", 4000), 100.0)  # re-INVITE
    assert decide(pol, st, EVIL, rtp(ssrc=0xEEEE), 100.5) == latch.ACCEPT  # relearning
    decide(pol, st, NAT, rtp(), 101.0)
    decide(pol, st, EVIL, rtp(ssrc=0xEEEE), 103.0)
    assert decide(pol, st, NAT, rtp(), 104.0) == latch.ACCEPT
    assert st.latched and st.remote == NAT


def test_off_never_learns():
    pol = latch.Policy(learning="off")
    st = stream()
    assert decide(pol, st, SDP, rtp(), 1.0) == latch.DROP  # no address yet
    latch.prefill(st, SDP, 0.0)
    assert decide(pol, st, NAT, rtp(), 1.0) == latch.ACCEPT  # same host, any port
    assert decide(pol, st, EVIL, rtp(), 1.0) == latch.DROP
    assert st.remote == SDP and not st.untrusted
    strict = latch.Policy(learning="off", strict=True)
    assert decide(strict, st, NAT, rtp(), 1.0) == latch.DROP
    assert decide(strict, st, SDP, rtp(), 1.0) == latch.ACCEPT and st.latched
    latch.prefill(st, NAT, 5.0)  # re-INVITE moves the destination
    assert st.remote == NAT


def test_update_window_takes_only_valid_rtp_rtcp_follows():
    # rtpproxy's _rtpp_stream_check_latch_override: RTCP and non-RTP never
    # re-latch; RTCP follows a new RTP host (guess, then its first packet)
    s = Session.new("c", "f", 0.0, 60)
    rtp_st, rtcp_st = s.rtp[1], s.rtcp[1]
    latch.prefill(rtp_st, A, 0.0)
    latch.prefill(rtcp_st, (A[0], A[1] + 1), 0.0)
    p = rtp()
    latch.accept(rtp_st, A, p, len(p), 1.0)
    latch.accept(rtcp_st, (A[0], A[1] + 1), p, len(p), 1.0)
    assert rtp_st.latched and rtcp_st.latched
    latch.prefill(rtp_st, A, 100.0)  # re-INVITE: window
    latch.prefill(rtcp_st, (A[0], A[1] + 1), 100.0)
    junk = bytearray(b"\x00" * 40)
    assert latch.accept(rtp_st, EVIL, junk, len(junk), 101.0) == latch.DROP
    assert latch.accept(rtcp_st, EVIL, p, len(p), 101.0) == latch.DROP
    moved = ("127.0.0.7", 5000)
    assert latch.accept(rtp_st, moved, p, len(p), 102.0) == latch.ACCEPT
    assert rtcp_st.remote == ("127.0.0.7", 5001) and not rtcp_st.latched
    nat_rtcp = ("127.0.0.7", 6001)
    assert latch.accept(rtcp_st, nat_rtcp, p, len(p), 103.0) == latch.ACCEPT
    assert rtcp_st.remote == nat_rtcp and rtcp_st.latched
