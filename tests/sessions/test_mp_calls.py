"""MediaProxy's session semantics with a fake relay (pure)."""

from __future__ import annotations

import itertools

from pyrtpproxy.protocol import mediaproxy as P
from pyrtpproxy.sessions import mediaproxy as M


class FakeBackend:
    def __init__(self) -> None:
        self.ports = itertools.count(30000, 2)
        self.open_streams: dict[int, dict] = {}
        self.log: list[tuple] = []

    def open(self, call, stream, remote, now):
        h = {
            "ports": [next(self.ports), next(self.ports)],
            "remote": [None, remote],
            "hold": False,
            "pk": [0, 0],
        }
        self.open_streams[id(h)] = h
        self.log.append(("open", stream.initiator, remote))
        return h

    def set_remote(self, h, index, remote, now):
        h["remote"][index] = remote
        self.log.append(("set", index, remote))

    def set_hold(self, h, hold, now):
        h["hold"] = hold

    def local(self, h, index):
        return "10.0.0.1", h["ports"][index]

    def counters(self, h, index):
        return h["pk"][index], 172 * h["pk"][index], None

    def close(self, h, now):
        self.open_streams.pop(id(h))

    def relay_ip(self, call):
        return "10.0.0.1"


def upd(typ, cseq, ft, tt, media, dialog_id=None):
    return P.Update(
        type=typ,
        call_id="c",
        cseq=cseq,
        from_uri="a",
        to_uri="b",
        from_tag=ft,
        to_tag=tt,
        user_agent="ua",
        dialog_id=dialog_id,
        media=P.parse_media(media) if media else (),
    )


def ports(reply: bytes) -> list[int]:
    ip, *p = reply.decode().split()
    assert ip == "10.0.0.1"
    return [int(x) for x in p]


def test_offer_answer_reinvites_keep_ports():
    be = FakeBackend()
    calls = M.Calls(be)
    callee_facing = ports(calls.update(upd("request", 1, "A", None, "audio:1.1.1.1:1000:sendrecv"), 0))
    caller_facing = ports(calls.update(upd("reply", 1, "A", "B", "audio:2.2.2.2:2000:sendrecv"), 1))
    assert callee_facing != caller_facing and len(be.open_streams) == 1
    h = next(iter(be.open_streams.values()))
    assert h["remote"] == [("2.2.2.2", 2000), ("1.1.1.1", 1000)]
    # re-INVITE from B (the callee): its own CSeq, tags swapped
    assert ports(calls.update(upd("request", 7, "B", "A", "audio:2.2.2.2:2000:sendrecv"), 2)) == caller_facing
    assert ports(calls.update(upd("reply", 7, "B", "A", "audio:1.1.1.1:1000:sendrecv"), 3)) == callee_facing
    assert len(be.open_streams) == 1
    # hold by the caller keeps the stream, with the longer timeout
    assert ports(calls.update(upd("request", 2, "A", "B", "audio:1.1.1.1:1000:sendonly"), 4)) == callee_facing
    assert h["hold"] is True
    call = calls.find("c", "A", None)
    assert call is not None and call.cseq == (2, 7)
    reply, gone = calls.remove(P.Remove("c", "B", "A"), 5)
    assert reply == P.REPLY_REMOVED and gone is call and not be.open_streams
    assert calls.remove(P.Remove("c", "A", "B"), 6) == (P.REPLY_ERROR, None)


def test_reply_without_session_and_old_cseq():
    calls = M.Calls(FakeBackend())
    assert calls.update(upd("reply", 1, "A", "B", None), 0) == P.REPLY_NONE
    calls.update(upd("request", 5, "A", None, "audio:1.1.1.1:1000:sendrecv"), 0)
    # a 200 without SDP changes nothing
    calls.update(upd("reply", 5, "A", "B", None), 0)
    call = calls.find("c", "A", "B")
    assert call.to_tag == "B" and call.start_time == 0
    # an older CSeq is ignored and gets no ports of its own
    assert calls.update(upd("request", 3, "A", "B", "audio:9.9.9.9:9:sendrecv"), 1) == P.REPLY_NONE


def test_timeout_of_every_stream_expires_the_call():
    be = FakeBackend()
    calls = M.Calls(be)
    calls.update(
        upd("request", 1, "A", None, "audio:1.1.1.1:1000:sendrecv,video:1.1.1.1:1002:sendrecv", "42"), 0
    )
    calls.update(upd("reply", 1, "A", "B", "audio:2.2.2.2:2000:sendrecv,video:2.2.2.2:2002:sendrecv"), 1)
    handles = list(be.open_streams.values())
    handles[0]["pk"] = [5, 5]
    be.open_streams.clear()
    assert calls.stream_gone(handles[0], 60, timeout=True) is None  # video still alive
    call = calls.stream_gone(handles[1], 61, timeout=True)
    assert call is not None and call.ended == "expired"
    stats = calls.statistics(call, 61, 1000.0)
    assert [s["status"] for s in stats["streams"]] == ["conntrack timeout", "no-traffic timeout"]
    assert M.totals(stats) == (10, 1720) and not M.ice_only(stats)
    assert stats["start_time"] == 940.0 and stats["duration"] == 60
    # the module's remove after the dialog ended: "removed"
    assert calls.remove(P.Remove("c", "A", "B"), 62) == (P.REPLY_REMOVED, None)


def test_ice_streams_without_traffic_do_not_count_as_a_timeout():
    be = FakeBackend()
    calls = M.Calls(be)
    calls.update(upd("request", 1, "A", None, "audio:1.1.1.1:1000:sendrecv:ice=yes", "42"), 0)
    calls.update(upd("reply", 1, "A", "B", "audio:2.2.2.2:2000:sendrecv:ice=yes"), 1)
    (h,) = be.open_streams.values()
    call = calls.stream_gone(h, 90, timeout=True)
    assert M.ice_only(calls.statistics(call, 90, 0.0))


def test_disabled_streams_take_no_ports():
    be = FakeBackend()
    calls = M.Calls(be)
    r = calls.update(upd("request", 1, "A", None, "audio:1.1.1.1:1000:sendrecv,video:1.1.1.1:0:sendrecv"), 0)
    assert ports(r)[1] == 0 and len(be.open_streams) == 1
    # the answer leaves the audio out too: rejected, ports freed
    r = calls.update(upd("reply", 1, "A", "B", "audio:2.2.2.2:0:sendrecv"), 1)
    assert ports(r) == [0, 0] and not be.open_streams


# ---- any sequence of requests: replies in the grammar, no ports leaked ------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_tags = st.sampled_from(["A", "B", "C"])
_item = st.builds(
    lambda t, ip, port, d: f"{t}:{ip}:{port}:{d}",
    st.sampled_from(["audio", "video"]),
    st.sampled_from(["1.1.1.1", "2.2.2.2", "0.0.0.0"]),
    st.sampled_from([0, 1000, 2000]),
    st.sampled_from(["sendrecv", "sendonly", "inactive"]),
)
_update = st.builds(
    lambda typ, cseq, ft, tt, items: ("u", typ, cseq, ft, tt, ",".join(items)),
    st.sampled_from(["request", "reply"]),
    st.integers(1, 4),
    _tags,
    st.one_of(st.none(), _tags),
    st.lists(_item, max_size=3),
)
_remove = st.builds(lambda ft, tt: ("r", ft, tt), _tags, st.one_of(st.none(), _tags))
_gone = st.builds(lambda i, t: ("g", i, t), st.integers(0, 5), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_update, _remove, _gone), max_size=25))
def test_any_request_sequence(ops):
    be = FakeBackend()
    calls = M.Calls(be)
    now = 0.0
    for op in ops:
        now += 1
        if op[0] == "u":
            _, typ, cseq, ft, tt, media = op
            try:
                reply = calls.update(upd(typ, cseq, ft, tt, media or None), now)
            except P.MPError:
                continue
            assert reply == P.REPLY_NONE or reply.startswith(b"10.0.0.1 ") and reply.endswith(b"\r\n")
        elif op[0] == "r":
            reply, _ = calls.remove(P.Remove("c", op[1], op[2]), now)
            assert reply in (P.REPLY_REMOVED, P.REPLY_ERROR)
        else:
            handles = list(be.open_streams.values())
            if handles:
                h = handles[op[1] % len(handles)]
                be.open_streams.pop(id(h))
                calls.stream_gone(h, now, timeout=op[2])
        # every open relay stream belongs to a live call's stream
        owned = {id(s.handle) for c in calls.calls.values() for s in c.all_streams() if s.handle is not None}
        assert set(be.open_streams) == owned
    for c in list(calls.calls.values()):
        calls.remove(P.Remove("c", c.from_tag, None), now + 1)
    assert not be.open_streams and not calls.calls
