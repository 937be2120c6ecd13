"""MediaProxy's dispatcher protocol: framing, parsing, replies (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrtpproxy.protocol import mediaproxy as P

SPEC_5_1 = (
    b"update\r\ntype: request\r\ndialog_id: 5046852567894\r\ncall_id: cpy-1-c1d9a041bb0c@127.0.0.1\r\n"
    b"cseq: 1\r\nfrom_uri: a@127.0.0.1\r\nto_uri: b@127.0.0.1:5674\r\nfrom_tag: a5707a6b\r\nto_tag: \r\n"
    b"user_agent: call.py\r\nsignaling_ip: 127.0.0.1\r\nmedia_relay: \r\n"
    b"media: audio:127.0.0.1:60718:sendrecv:ice=no\r\n\r\n"
)


def test_spec_request_parses():
    (lines,) = P.RequestFramer().feed(SPEC_5_1)
    req = P.parse_request(lines)
    assert isinstance(req, P.Update)
    assert req.type == "request" and req.cseq == 1 and req.dialog_id == "5046852567894"
    assert req.to_tag is None and req.media_relay is None  # empty values are absent
    assert req.to_uri == "b@127.0.0.1:5674" and req.user_agent == "call.py"
    assert req.media == (P.MediaItem("audio", "127.0.0.1", 60718, "sendrecv", (("ice", "no"),)),)
    assert req.media[0].ice is False


def test_framer_any_split_and_queries():
    data = SPEC_5_1 + b"\r\nsummary\r\nremove\r\ncall_id: c\r\nfrom_tag: f\r\nto_tag: t\r\n\r\n"
    for cut in range(len(data)):
        f = P.RequestFramer()
        got = f.feed(data[:cut]) + f.feed(data[cut:])
        assert [r[0] for r in got] == ["update", "summary", "remove"]
    rm = P.parse_request(got[2])
    assert rm == P.Remove("c", "f", "t")
    assert P.parse_request(got[1]) == P.Query("summary")


def test_framer_limits_a_request():
    f = P.RequestFramer(max_request=100)
    with pytest.raises(P.MPError):
        f.feed(b"update\r\n" + b"x: " + b"y" * 200)


@pytest.mark.parametrize(
    "media",
    ["audio:1.2.3.4:70000:sendrecv", "audio:1.2.3.4:5", "audio:::1:5:sendrecv", "audio:1.2.3.4:x:sendrecv"],
)
def test_bad_media_is_an_error(media):
    with pytest.raises(P.MPError):
        P.parse_media(media)


def test_media_items_and_hold():
    items = P.parse_media("audio:0.0.0.0:4000:sendrecv:ice=yes,video:1.2.3.4:0:inactive:ice=no")
    assert items[0].on_hold and items[0].ice and items[1].on_hold and items[1].port == 0


def test_dialog_end_id_is_the_dlg_list_id():
    # spec 6.5: dialog_id 14955689039161 -> a9d.93558842
    assert P.dialog_end_id("14955689039161", "cid") == "a9d.93558842"
    assert P.dialog_end_id(str((0x10 << 32) | 0), "cid") == "01.0"
    assert P.dialog_end_id(None, "cid") == "cid"
    assert P.dialog_end_id("junk", "cid") == "cid"


def test_reply_format():
    assert P.format_update_reply("127.0.0.1", [33002, 0]) == b"127.0.0.1 33002 0\r\n"


def test_signaling_ip_forms():
    assert P.plain_signaling_ip("10.0.0.1") == "10.0.0.1"
    assert P.plain_signaling_ip("10.0.0.1_10.0.0.2") == "10.0.0.1"
    assert P.plain_signaling_ip('{"signaling_ip": "10.0.0.3", "username": "u"}') == "10.0.0.3"


@given(st.binary(max_size=400))
def test_any_bytes_never_crash(data):
    f = P.RequestFramer(max_request=300)
    try:
        reqs = f.feed(data)
    except P.MPError:
        return
    for lines in reqs:
        try:
            P.parse_request(lines)
        except P.MPError:
            pass
