"""Session snapshots: take/restore round trips, encoding, schema migration."""

from __future__ import annotations

import json

import pytest

from pyrtpproxy.protocol.inet import AF_INET, AF_INET6
from pyrtpproxy.sessions import snapshot as snap
from pyrtpproxy.sessions.session import Session

MONO, WALL = 1000.0, 1_700_000_000.0


def _session() -> Session:
    s = Session.new("call-1", "ftag;1", MONO - 5, 60.0)
    s.complete = True
    s.strong = True
    s.weak = [False, True]
    s.codecs = [(0, 8), None]
    s.codecs_text = ["0,8", None]
    s.ptime = [20, None]
    s.notify_socket = "tcp:127.0.0.1:9999"
    s.notify_tag = "tag 1"
    s.notify_host = "127.0.0.1"
    s.reset_at = [MONO - 2, MONO - 1]
    s.ttl_override = [None, 30]
    for i, port in ((0, 40000), (1, 40002)):
        rtp, rtcp = s.rtp[i], s.rtcp[i]
        rtp.sock = rtcp.sock = object()
        rtp.port, rtcp.port = port, port + 1
        rtp.family = rtcp.family = AF_INET
        rtp.laddr = rtcp.laddr = "127.0.0.1"
        rtp.shown = rtcp.shown = "127.0.0.1"
    s.rtp[0].remote = ("127.0.0.1", 5000)
    s.rtp[0].latched = True
    s.rtp[0].untrusted = True
    s.rtp[0].ssrc, s.rtp[0].seq, s.rtp[0].nlatch = 0x1234, 77, 2
    s.rtp[0].last_rx = MONO - 0.5
    s.rtp[0].npkts_in, s.rtp[0].nrelayed, s.rtp[0].ndropped = 10, 9, 1
    s.rtp[1].remote = ("::1", 6000, 0, 0)
    s.rtp[1].sdp = ("::1", 6000, 0, 0)
    s.rtp[1].learn_until = MONO + 2
    s.rtp[1].asymmetric = True
    s.rtp[1].last_update = MONO - 3
    return s


def test_round_trip_keeps_state_and_moves_times_to_the_new_clock():
    s = _session()
    sn = snap.take(s, MONO, WALL)
    back = snap.decode(snap.encode(sn))
    assert back == sn
    # A restart: the monotonic clock is elsewhere, the wall clock 10 s later.
    r = snap.restore(back, 50.0, WALL + 10)
    assert (r.call_id, r.tag, r.complete, r.strong, r.weak) == ("call-1", "ftag;1", True, True, [False, True])
    assert r.codecs == [(0, 8), None] and r.ptime == [20, None]
    assert (r.notify_socket, r.notify_tag) == ("tcp:127.0.0.1:9999", "tag 1")
    assert r.reset_at == pytest.approx([50.0 - 12, 50.0 - 11])
    assert r.ttl_override == [None, 30]
    a, b = r.rtp
    assert (a.port, a.family, a.laddr, a.remote, a.latched, a.untrusted) == (
        40000,
        AF_INET,
        "127.0.0.1",
        ("127.0.0.1", 5000),
        True,
        True,
    )
    assert (a.ssrc, a.seq, a.nlatch, a.npkts_in, a.nrelayed, a.ndropped) == (0x1234, 77, 2, 10, 9, 1)
    assert a.last_rx == pytest.approx(50.0 - 10.5)
    assert b.remote == ("::1", 6000, 0, 0) and b.asymmetric
    assert b.sdp == ("::1", 6000, 0, 0) and b.learn_until == pytest.approx(42.0)
    assert a.sdp is None and a.learn_until == 0.0
    assert b.last_rx == -1e9  # never received: stays "never"
    assert r.rtcp[1].port == 40003 and r.rtp[0].sock is None


def test_deadline_matches_the_session_tables_rule():
    s = _session()
    sn = snap.take(s, MONO, WALL)
    for independent in (False, True):
        want = s.expires_at(independent) - MONO + WALL
        assert sn.deadline(independent) == pytest.approx(want)


def test_pending_interface_and_unbound_stream():
    s = Session.new("c", "f", MONO, 60.0)
    s.rtp[0].sock = object()
    s.rtp[0].port, s.rtp[0].family = 40000, AF_INET6
    s.rtp[1].pending_iface = snap.IfaceSnap(AF_INET, "127.0.0.1", "192.0.2.1", "pub")
    back = snap.decode(snap.encode(snap.take(s, MONO, WALL)))
    assert back.rtp[0].family == AF_INET6
    assert back.rtp[1].port == 0 and back.rtp[1].pending == snap.IfaceSnap(
        AF_INET, "127.0.0.1", "192.0.2.1", "pub"
    )


def test_schema_1_is_migrated():
    d = json.loads(snap.encode(snap.take(_session(), MONO, WALL)))
    d["v"] = 1
    d["reset"] = d.pop("reset_at")[0]
    del d["recs"]
    sn = snap.decode(json.dumps(d).encode())
    assert sn.reset_at == (d["reset"], d["reset"]) and sn.recs == ()


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x00\x01garbage", "not a session snapshot"),
        (b"[1, 2]", "no schema version"),
        (b'{"v": 3}', "newer"),
        (b'{"v": 0}', "too old"),
        (b'{"v": 2, "call_id": "x"}', "malformed"),
        (b'{"v": 1, "call_id": "x"}', "could not be migrated"),
    ],
)
def test_bad_snapshots_are_refused_never_misread(data, words):
    with pytest.raises(snap.SchemaError, match=words):
        snap.decode(data)


def test_session_key_is_unambiguous():
    assert snap.session_key("a b", "c") != snap.session_key("a", "b c")
