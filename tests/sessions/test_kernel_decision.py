"""The pure decision of the kernel path: which flows a session may have."""

from __future__ import annotations

from pyrtpproxy.protocol.inet import AF_INET, AF_INET6
from pyrtpproxy.sessions import kernel as K
from pyrtpproxy.sessions.session import Session


def latched_session() -> Session:
    s = Session.new("c", "ft", 0.0, 60)
    s.complete = True
    for i, (port, remote) in enumerate(((40000, ("10.0.0.2", 5002)), (40002, ("10.0.1.2", 6000)))):
        for st, delta in ((s.rtp[i], 0), (s.rtcp[i], 1)):
            st.sock = object()
            st.port = port + delta
            st.family = AF_INET
            st.active = True
            st.remote = (remote[0], remote[1] + delta)
            st.latched = True
        s.rtp[i].tos = 0xB8
    return s


def test_both_pipes_both_ways():
    s = latched_session()
    fl = K.flows(s)
    assert len(fl) == 4
    a_to_b = next(f for f in fl if f.lport == 40000)
    assert (a_to_b.src, a_to_b.sport, a_to_b.dst, a_to_b.dport, a_to_b.out_port) == (
        "10.0.0.2",
        5002,
        "10.0.1.2",
        6000,
        40002,
    )
    assert a_to_b.tos == 0xB8 and a_to_b.laddr is None and a_to_b.out_addr is None
    rtcp = next(f for f in fl if f.lport == 40003)
    assert (rtcp.dst, rtcp.dport, rtcp.out_port) == ("10.0.0.2", 5003, 40001)


def test_unlatched_rtcp_stays_in_userspace_rtp_goes():
    s = latched_session()
    s.rtcp[1].latched = False
    assert {f.lport for f in K.flows(s)} == {40000, 40002}


def test_reasons_to_stay_in_userspace():
    def changed(fn):
        s = latched_session()
        fn(s)
        return K.flows(s)

    assert changed(lambda s: setattr(s, "complete", False)) == ()
    assert changed(lambda s: setattr(s, "deleted", True)) == ()
    assert changed(lambda s: setattr(s, "kernel_hold", 1)) == ()
    assert changed(lambda s: setattr(s.rtp[0], "latched", False)) == ()
    assert changed(lambda s: setattr(s.rtp[1], "asymmetric", True)) == ()
    assert changed(lambda s: setattr(s.rtp[1], "family", AF_INET6)) == ()
    assert changed(lambda s: setattr(s.rtp[0], "muted", True)) == ()
    assert changed(lambda s: setattr(s.rtp[0], "rec", lambda *a: None)) == ()
    assert changed(lambda s: setattr(s.rtp[0], "on_hold", True)) == ()
    assert changed(lambda s: setattr(s.rtp[0], "remote", ("0.0.0.0", 5000))) == ()
    assert changed(lambda s: s.players.__setitem__(0, object())) == ()
    assert changed(lambda s: setattr(s.rtp[0], "laddr", "10.9.9.9")) == ()  # bridged
    assert K.flows(latched_session(), dup_small=True) == ()
    # IPv6 only where the host forwards it
    v6 = latched_session()
    for st in v6.streams():
        st.family = AF_INET6
        st.remote = ("fd00::2",) + tuple(st.remote[1:]) + (0, 0)
    assert K.flows(v6) == ()
    assert {f.family for f in K.flows(v6, ipv6=True)} == {AF_INET6}
    assert K.userspace_reason(latched_session()) is None


def test_booked_packets_count_and_move_the_sequence():
    s = latched_session()
    st = s.rtp[0]
    st.seq = 0xFFF0
    K.apply_counts(st, 32, 12.5, 32 * 172)
    assert (st.npkts_in, st.nrelayed, st.last_rx, st.seq, st.nbytes) == (32, 32, 12.5, 0x10, 32 * 172)
    K.apply_counts(s.rtcp[0], 3, 13.0)
    assert s.rtcp[0].npkts_in == 3 and s.rtcp[0].seq == 0
