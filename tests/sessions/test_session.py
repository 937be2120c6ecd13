"""Session table: tag matching and TTLs with an explicit clock."""

from pyrtpproxy.sessions.session import Session, SessionTable


def table_with(*tags, call="c", now=0.0, ttl=10):
    t = SessionTable()
    out = []
    for tag in tags:
        s = Session.new(call, tag, now, ttl)
        t.add(s)
        out.append(s)
    return t, out


def test_exact_forward_and_reverse():
    t, (s,) = table_with("fA;1")
    assert t.find("c", "fA;1", None) == (s, 0)
    assert t.find("c", "tB;1", "fA;1") == (s, 1)
    assert t.find("c", "fA", "tB") is None
    # reverse match with the medianum carried by the from-tag only
    assert t.find("c", "tB;1", "fA") == (s, 1)
    assert t.find("other", "fA;1", None) is None


def test_prefix_match_for_delete():
    t, (s1, s2) = table_with("fA;1", "fA;2")
    assert {id(s) for s, _ in t.find_prefix("c", "fA", None)} == {id(s1), id(s2)}
    assert t.find_prefix("c", "tB", "fA") == [(s1, 1), (s2, 1)]
    assert t.find_prefix("c", "f", None) == []


def test_setup_ttl_then_expiry():
    t, (s,) = table_with("f", ttl=10)
    assert t.next_deadline() == 10
    assert t.expire(9.9) == []
    assert t.expire(10.0) == [s]


def test_packets_push_the_deadline_lazily():
    t, (s,) = table_with("f", ttl=10)
    s.rtp[0].last_rx = 8.0
    assert t.expire(10.0) == []
    assert t.next_deadline() == 18.0
    assert t.expire(18.0) == [s]


def test_ttl_left_counts_down_like_q():
    t, (s,) = table_with("f", ttl=20)
    assert s.ttl_left(0.0, False) == 20
    assert s.ttl_left(0.5, False) == 20
    assert s.ttl_left(5.0, False) == 15
    assert s.ttl_left(30.0, False) == 0


def test_independent_ttl_either_side_silent():
    t = SessionTable(independent_ttl=True)
    s = Session.new("c", "f", 0.0, 10)
    t.add(s)
    s.rtp[0].last_rx = 9.0  # only one direction has traffic
    assert t.expire(10.0) == [s]


def test_unified_ttl_any_side_keeps_alive():
    t, (s,) = table_with("f", ttl=10)
    s.rtp[1].last_rx = 9.0
    assert t.expire(10.0) == []


def test_removed_sessions_leave_the_schedule():
    t, (s,) = table_with("f")
    t.remove(s)
    assert t.next_deadline() is None
    assert t.expire(100) == []
    assert len(t) == 0
