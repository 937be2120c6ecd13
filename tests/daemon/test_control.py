"""Control sockets: URL parsing, binding, and serving over real loopback sockets."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

import attrs
import psutil
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.control import (
    BoundControl,
    ControlBindError,
    ControlSpec,
    bind_control,
    parse_control_url,
    serve,
    systemd_listen_fd,
)
from pyrtpproxy.protocol.framing import LineFramer, ReplyCache, split_cookie, strip_oneshot

TIMEOUT = 10


# --------------------------------------------------------------------------
# helpers


@attrs.define(eq=False)
class FakeHandler:
    """A tiny stand-in for the dispatcher."""

    calls: list[tuple[bytes, str | None]] = attrs.Factory(list)
    received: int = 0
    dups: int = 0
    nupdates: int = 0
    gate: trio.Event | None = None

    async def handle(self, data: bytes, peer_host: str | None) -> bytes:
        self.calls.append((data, peer_host))
        await trio.lowlevel.checkpoint()
        args = data.split()
        if b"\0" in data or not args:
            return b"E5\n"
        cmd = args[0]
        if cmd == b"V":
            return b"E1\n" if len(args) > 1 else b"20040107\n"
        if cmd == b"VF":
            return b"1\n" if args[1:] == [b"20050322"] else b"0\n"
        if cmd == b"I":
            return b"sessions created: 0\nactive sessions: 0\n"
        if cmd == b"X":
            return b"0\n"
        if cmd == b"U":
            self.nupdates += 1
            return b"%d 127.0.0.1\n" % (20000 + 2 * self.nupdates)
        if cmd == b"BOOM":
            raise RuntimeError("handler bug")
        if cmd == b"SILENT":
            return b""
        if cmd == b"WAIT":
            assert self.gate is not None
            await self.gate.wait()
            return b"0\n"
        return b"E0\n"

    def note_received(self) -> None:
        self.received += 1

    def note_duplicate(self) -> None:
        self.dups += 1


@pytest.fixture
def sockdir():
    # short path: sun_path is 108 bytes and pytest's tmp_path can be long
    d = tempfile.mkdtemp(prefix="rtpc", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def handler():
    return FakeHandler()


async def start(nursery, bound, handler, **kw):
    await nursery.start(lambda task_status: serve(bound, handler, task_status=task_status, **kw))


async def udp_client(family=socket.AF_INET):
    s = trio.socket.socket(family, socket.SOCK_DGRAM)
    return s


async def udp_ask(s, addr, payload: bytes) -> bytes:
    await s.sendto(payload, addr)
    data, _ = await s.recvfrom(65536)
    return data


async def stream_connect(addr, family):
    s = trio.socket.socket(family, socket.SOCK_STREAM)
    await s.connect(addr)
    return trio.SocketStream(s)


async def read_until_eof(stream) -> bytes:
    out = b""
    while True:
        d = await stream.receive_some(65536)
        if not d:
            return out
        out += d


async def read_exactly_lines(stream, n: int) -> bytes:
    out = b""
    while out.count(b"\n") < n:
        d = await stream.receive_some(65536)
        assert d, f"EOF after {out!r}"
        out += d
    return out


# --------------------------------------------------------------------------
# parse_control_url


@pytest.mark.parametrize(
    "text, expect",
    [
        ("udp:127.0.0.1:22322", ControlSpec("udp", "127.0.0.1", 22322)),
        ("udp:127.0.0.1", ControlSpec("udp", "127.0.0.1", 22222)),
        ("udp:127.0.0.1:", ControlSpec("udp", "127.0.0.1", 22222)),
        ("udp:*:7722", ControlSpec("udp", "*", 7722)),
        ("udp:localhost", ControlSpec("udp", "localhost", 22222)),
        ("udp6:::1:22326", ControlSpec("udp6", "::1", 22326)),
        ("udp6::::1", ControlSpec("udp6", "::", 1)),  # last ':' is the port
        ("udp6:fe80::1%lo:5", ControlSpec("udp6", "fe80::1%lo", 5)),
        ("udp6:*", ControlSpec("udp6", "*", 22222)),
        ("tcp:127.0.0.1:22323", ControlSpec("tcp", "127.0.0.1", 22323)),
        ("tcp6:::1:0", ControlSpec("tcp6", "::1", 0)),
        ("unix:/var/run/rtpproxy.sock", ControlSpec("unix", path="/var/run/rtpproxy.sock")),
        ("/var/run/rtpproxy.sock", ControlSpec("unix", path="/var/run/rtpproxy.sock")),
        ("rel/sock", ControlSpec("unix", path="rel/sock")),
        ("cunix:/run/r.sock", ControlSpec("cunix", path="/run/r.sock")),
        ("stdio:", ControlSpec("stdio")),
        ("stdioc:", ControlSpec("stdioc")),
        ("systemd:", ControlSpec("systemd")),
    ],
)
def test_parse_ok(text, expect):
    got = parse_control_url(text)
    assert got == expect
    assert got.text == text


@pytest.mark.parametrize(
    "text, words",
    [
        ("udp6:[::1]:22326", "bracket"),
        ("udp6:::1", "not an IPv6 address"),
        ("tcp6:::", "not an IPv6 address"),
        ("udp:::1:5000", "not an IPv4 host"),
        ("udp:[::1]", "bracket"),
        ("udp::22222", "missing host"),
        ("udp:", "missing host"),
        ("tcp:127.0.0.1:http", "bad port"),
        ("udp:127.0.0.1:-1", "bad port"),
        ("udp:127.0.0.1:65536", "out of range"),
        ("udp:127.0.0.1: 5", "bad port"),
        ("unix:", "empty"),
        ("cunix:", "empty"),
        ("", "empty"),
        ("unix:/" + "x" * 120, "too long"),
        ("stdio:foo", "nothing may follow"),
        ("systemd:x", "nothing may follow"),
        ("unix:/a\0b", "NUL"),
    ],
)
def test_parse_bad(text, words):
    with pytest.raises(ValueError, match=words):
        parse_control_url(text)


def test_spec_str():
    assert str(parse_control_url("udp:1.2.3.4")) == "udp:1.2.3.4:22222"
    assert str(parse_control_url("/x")) == "unix:/x"
    assert str(parse_control_url("stdio:")) == "stdio:"


# --------------------------------------------------------------------------
# framing (pure)


def test_split_cookie():
    assert split_cookie(b"c1 V") == (b"c1", b"V")
    assert split_cookie(b"c2\tV") == (b"c2", b"V")
    assert split_cookie(b"c3 V\r\n") == (b"c3", b"V\r\n")
    assert split_cookie(b"c4   VF    20040107  ") == (b"c4", b"VF    20040107  ")
    assert split_cookie(b"c1\n") == (b"c1", b"")
    assert split_cookie(b"c1") == (b"c1", b"")
    assert split_cookie(b"  c1 V") == (b"c1", b"V")
    assert split_cookie(b"") == (None, b"")
    assert split_cookie(b" \r\n\t") == (None, b"")
    assert split_cookie(b"c\x001 V") == (None, b"")
    assert split_cookie(b"c1 V\x00") == (b"c1", b"V\x00")


def test_strip_oneshot():
    assert strip_oneshot(b"V\n") == b"V"
    assert strip_oneshot(b"V\r\n") == b"V"
    assert strip_oneshot(b"V") == b"V"
    assert strip_oneshot(b"V\n\n") == b"V\n"
    assert strip_oneshot(b"V\nV\n") == b"V\nV"


def test_line_framer_basic():
    f = LineFramer()
    assert f.feed(b"V\nVF 20050322\nI") == [b"V", b"VF 20050322"]
    assert f.pending == 1
    assert f.feed(b"\nX\n") == [b"I", b"X"]
    assert f.feed(b"a\r\n\n") == [b"a", b""]
    assert f.feed(b"x\r") == []
    assert f.feed(b"\n") == [b"x"]
    assert f.feed(b"") == []
    assert f.pending == 0


def test_line_framer_bytewise():
    f = LineFramer()
    out = []
    for b in b"V\nVF 20050322\n":
        out += f.feed(bytes([b]))
    assert out == [b"V", b"VF 20050322"]


def test_line_framer_overflow():
    f = LineFramer(max_line=8)
    # 7 bytes + \n fits exactly
    assert f.feed(b"1234567\n") == [b"1234567"]
    # 8 bytes of content does not, even with its \n in the same chunk
    assert f.feed(b"12345678\nok\n") == [None, b"ok"]
    # detected before the \n arrives; buffer never exceeds max_line - 1
    assert f.feed(b"ab\n1234") == [b"ab"]
    assert f.pending == 4
    assert f.feed(b"567") == []
    assert f.pending == 7
    assert f.feed(b"8") == [None]
    assert f.pending == 0 and f.discarding
    assert f.feed(b"9" * 100) == []
    assert f.feed(b"99\nnext\n") == [b"next"]
    assert not f.discarding
    assert f.overflows == 2


def test_line_framer_no_rescan():
    # a large stream fed in small pieces must stay linear
    f = LineFramer(max_line=1 << 20)
    chunk = b"x" * 1000
    for _ in range(1000):
        assert f.feed(chunk) == []
    assert f.feed(b"\n") == [b"x" * 1_000_000]


def _reference_lines(stream: bytes, max_line: int) -> list[bytes | None]:
    parts = stream.split(b"\n")
    out: list[bytes | None] = []
    for p in parts[:-1]:
        if len(p) >= max_line:
            out.append(None)
        else:
            out.append(p[:-1] if p.endswith(b"\r") else p)
    if len(parts[-1]) >= max_line:
        out.append(None)
    return out


@given(
    st.lists(st.sampled_from([b"V", b"\n", b"\r", b"ab", b"xxxxxxx", b"\r\n"]), max_size=40),
    st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=40),
    st.integers(min_value=2, max_value=10),
)
def test_line_framer_any_chunking(pieces, cuts, max_line):
    stream = b"".join(pieces)
    f = LineFramer(max_line=max_line)
    got: list[bytes | None] = []
    i = 0
    k = 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        k += 1
        got += f.feed(stream[i : i + n])
        i += n
        assert f.pending < max_line
    assert got == _reference_lines(stream, max_line)


def test_reply_cache():
    c = ReplyCache(ttl=35.0, max_entries=3)
    c.put("a", b"A", 0.0)
    assert c.get("a", 34.9) == b"A"
    assert c.get("a", 35.0) is None
    assert len(c) == 0
    for i, k in enumerate("abcd"):
        c.put(k, k.encode(), 100.0 + i)
    assert len(c) == 3
    assert c.get("a", 104.0) is None  # evicted, oldest first
    assert c.get("d", 104.0) == b"d"
    assert c.nbytes == 3
    c2 = ReplyCache(max_bytes=10)
    c2.put(1, b"x" * 6, 0)
    c2.put(2, b"y" * 6, 0)
    assert c2.get(1, 0) is None and c2.get(2, 0) == b"y" * 6
    assert c2.expire(1000) == 1 and c2.nbytes == 0


# --------------------------------------------------------------------------
# UDP


async def test_udp_cookie_echo(nursery, handler):
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url("udp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler)
            addr = bound.sockname
            c = await udp_client()
            assert await udp_ask(c, addr, b"c1 V") == b"c1 20040107\n"
            assert await udp_ask(c, addr, b"c2\tV") == b"c2 20040107\n"
            assert await udp_ask(c, addr, b"c3 V\r\n") == b"c3 20040107\n"
            assert await udp_ask(c, addr, b"c4   VF    20050322  ") == b"c4 1\n"
            assert await udp_ask(c, addr, b"c5 V\nV") == b"c5 E1\n"
            # only a cookie: the handler gets b"" and answers E5
            assert await udp_ask(c, addr, b"c6\n") == b"c6 E5\n"
            assert (b"", "127.0.0.1") in handler.calls
            # no token at all: bare E5, like rtpproxy
            assert await udp_ask(c, addr, b"") == b"E5\n"
            assert await udp_ask(c, addr, b" \t\r\n") == b"E5\n"
            assert handler.received == 8 and handler.dups == 0
            assert handler.calls[0] == (b"V", "127.0.0.1")
            c.close()
            nursery.cancel_scope.cancel()


async def test_udp_retransmit_served_from_cache(nursery, handler):
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url("udp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler)
            addr = bound.sockname
            c = await udp_client()
            r1 = await udp_ask(c, addr, b"samecookie U rtx 127.0.0.1 5000 ft")
            r2 = await udp_ask(c, addr, b"samecookie U rtx 127.0.0.1 5000 ft")
            assert r1 == r2 == b"samecookie 20002 127.0.0.1\n"
            # same cookie, other command: still the cached reply (observed)
            assert await udp_ask(c, addr, b"samecookie V") == r1
            assert handler.nupdates == 1
            assert len(handler.calls) == 1
            assert handler.received == 1 and handler.dups == 2
            # another client reusing the cookie is a different request
            c2 = await udp_client()
            assert await udp_ask(c2, addr, b"samecookie V") == b"samecookie 20040107\n"
            assert handler.received == 2
            c.close()
            c2.close()
            nursery.cancel_scope.cancel()


async def test_udp_cache_expiry(nursery, handler, mock_clock):
    mock_clock.rate = 1.0  # real time flows; we jump over the cache TTL
    with trio.fail_after(120):
        bound = bind_control(parse_control_url("udp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler)
            addr = bound.sockname
            c = await udp_client()
            assert await udp_ask(c, addr, b"k U a 1.2.3.4 5 t") == b"k 20002 127.0.0.1\n"
            mock_clock.jump(34)
            assert await udp_ask(c, addr, b"k U a 1.2.3.4 5 t") == b"k 20002 127.0.0.1\n"
            assert handler.dups == 1
            mock_clock.jump(2)
            assert await udp_ask(c, addr, b"k U a 1.2.3.4 5 t") == b"k 20004 127.0.0.1\n"
            assert handler.nupdates == 2 and handler.dups == 1
            c.close()
            nursery.cancel_scope.cancel()


async def test_udp_shared_cache_and_oversize(nursery, handler):
    with trio.fail_after(TIMEOUT):
        cache = ReplyCache()
        bound = bind_control(parse_control_url("udp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler, reply_cache=cache)
            addr = bound.sockname
            c = await udp_client()
            big = b"c9 V " + b"x" * 9000
            assert await udp_ask(c, addr, big) == b"c9 E5\n"
            assert handler.calls[-1][0] == b""
            assert len(cache) == 1
            # a handler failure is logged and answered E5; the server lives on
            assert await udp_ask(c, addr, b"b1 BOOM") == b"b1 E5\n"
            assert await udp_ask(c, addr, b"b2 V") == b"b2 20040107\n"
            c.close()
            nursery.cancel_scope.cancel()


async def test_udp_arrival_order(nursery, handler):
    with trio.fail_after(TIMEOUT):
        handler.gate = trio.Event()
        bound = bind_control(parse_control_url("udp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler)
            addr = bound.sockname
            c = await udp_client()
            await c.sendto(b"a WAIT", addr)
            await c.sendto(b"b V", addr)
            await trio.testing.wait_all_tasks_blocked()
            assert [d for d, _ in handler.calls] == [b"WAIT"]
            handler.gate.set()
            assert (await c.recvfrom(100))[0] == b"a 0\n"
            assert (await c.recvfrom(100))[0] == b"b 20040107\n"
            c.close()
            nursery.cancel_scope.cancel()


async def test_udp6(nursery, handler):
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url("udp6:::1:0"))
        with bound:
            assert bound.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            await start(nursery, bound, handler)
            c = await udp_client(socket.AF_INET6)
            assert await udp_ask(c, bound.sockname, b"x V") == b"x 20040107\n"
            assert handler.calls == [(b"V", "::1")]
            c.close()
            nursery.cancel_scope.cancel()


def test_udp_rcvbuf_and_nonblocking():
    with bind_control(parse_control_url("udp:127.0.0.1:0")) as b:
        # Linux doubles the value it is given (capped by net.core.rmem_max)
        got = b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        with open("/proc/sys/net/core/rmem_max") as f:
            cap = int(f.read())
        assert got == 2 * min(208 * 1024, cap)
        assert not b.sock.getblocking()
        assert b.mode == "datagram"


def test_udp_bind_errors():
    with bind_control(parse_control_url("udp:127.0.0.1:0")) as b:
        port = b.sockname[1]
        with pytest.raises(ControlBindError, match="can't bind"):
            bind_control(parse_control_url(f"udp:127.0.0.1:{port}"))
    with pytest.raises(ControlBindError, match="resolve"):
        bind_control(parse_control_url("udp:no-such-host.invalid"), no_resolve=True)


# --------------------------------------------------------------------------
# unix: one command per connection


async def oneshot(path, payload: bytes) -> bytes:
    s = await stream_connect(path, socket.AF_UNIX)
    try:
        await s.send_all(payload)
        return await read_until_eof(s)
    finally:
        await s.aclose()


async def test_unix_oneshot(nursery, handler, sockdir):
    path = os.path.join(sockdir, "r.sock")
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(f"unix:{path}"))
        with bound:
            await start(nursery, bound, handler)
            assert await oneshot(path, b"V\n") == b"20040107\n"
            assert await oneshot(path, b"V") == b"20040107\n"
            assert await oneshot(path, b"V\r\n") == b"20040107\n"
            assert await oneshot(path, b"V\nV\n") == b"E1\n"
            assert handler.calls[-1] == (b"V\nV", "127.0.0.1")
            assert await oneshot(path, b"I") == b"sessions created: 0\nactive sessions: 0\n"
            assert await oneshot(path, b"BOOM") == b"E5\n"
            assert await oneshot(path, b"SILENT") == b""
            # too long: E5. The unread tail makes Linux reset the connection
            # after the reply, so read it the way Kamailio does (one read).
            s = await stream_connect(path, socket.AF_UNIX)
            await s.send_all(b"V " + b"x" * 9000)
            assert await s.receive_some(255) == b"E5\n"
            await s.aclose()
            # observed: a command split over two writes; the first write is the
            # whole command, then the connection is gone
            s = await stream_connect(path, socket.AF_UNIX)
            await s.send_all(b"VF 2005")
            assert await read_until_eof(s) == b"0\n"
            with pytest.raises(trio.BrokenResourceError):
                await s.send_all(b"0322\n")
            await s.aclose()
            # connect and leave: costs nothing
            s = await stream_connect(path, socket.AF_UNIX)
            await s.aclose()
            assert await oneshot(path, b"V") == b"20040107\n"
            assert handler.received == 10
            nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


async def test_unix_silent_client_blocks_nobody(nursery, handler, sockdir):
    path = os.path.join(sockdir, "r.sock")
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(path))
        with bound:
            await start(nursery, bound, handler)
            silent = [await stream_connect(path, socket.AF_UNIX) for _ in range(5)]
            assert await oneshot(path, b"V") == b"20040107\n"
            for s in silent:
                await s.aclose()
            nursery.cancel_scope.cancel()


async def test_unix_silent_client_times_out(nursery, handler, sockdir, autojump_clock):
    path = os.path.join(sockdir, "r.sock")
    with trio.fail_after(60):  # virtual time
        bound = bind_control(parse_control_url(path))
        with bound:
            await start(nursery, bound, handler, oneshot_timeout=10)
            s = await stream_connect(path, socket.AF_UNIX)
            t0 = trio.current_time()
            assert await read_until_eof(s) == b""
            assert 10 <= trio.current_time() - t0 < 11
            await s.aclose()
            assert handler.received == 0
            nursery.cancel_scope.cancel()


async def test_unix_fd_count_baseline(nursery, handler, sockdir):
    path = os.path.join(sockdir, "r.sock")
    proc = psutil.Process()
    with trio.fail_after(30):
        bound = bind_control(parse_control_url(path))
        with bound:
            await start(nursery, bound, handler)
            assert await oneshot(path, b"V") == b"20040107\n"  # warm up
            await trio.testing.wait_all_tasks_blocked()
            base = proc.num_fds()
            for i in range(200):
                if i % 2:
                    assert await oneshot(path, b"V") == b"20040107\n"
                else:
                    s = await stream_connect(path, socket.AF_UNIX)
                    await s.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert proc.num_fds() == base
            nursery.cancel_scope.cancel()


def test_unix_stale_socket_replaced_and_unlinked(sockdir):
    path = os.path.join(sockdir, "r.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()  # leaves a stale socket file behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    b = bind_control(parse_control_url(f"unix:{path}"))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not b.sock.getblocking()
    b.close()
    assert not os.path.exists(path)
    b.close()  # idempotent


def test_unix_regular_file_refused(sockdir):
    path = os.path.join(sockdir, "important.txt")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(ControlBindError, match="not a socket"):
        bind_control(parse_control_url(f"cunix:{path}"))
    with open(path) as f:
        assert f.read() == "keep me"


def test_unix_empty_placeholder_file_replaced(sockdir):
    """An empty regular file (mktemp's placeholder, as rtpproxy's test
    harness passes) is replaced by the socket; a directory is refused."""
    path = os.path.join(sockdir, "tmp.XXXX")
    open(path, "w").close()
    b = bind_control(parse_control_url(f"unix:{path}"))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    b.close()
    assert not os.path.exists(path)
    os.mkdir(path)
    with pytest.raises(ControlBindError, match="not a socket"):
        bind_control(parse_control_url(f"cunix:{path}"))
    assert os.path.isdir(path)


def test_unix_close_leaves_foreign_file(sockdir):
    path = os.path.join(sockdir, "r.sock")
    b = bind_control(parse_control_url(path))
    os.unlink(path)
    with open(path, "w") as f:
        f.write("someone else's")
    b.close()
    assert os.path.exists(path)


def test_unix_mode_and_owner(sockdir):
    path = os.path.join(sockdir, "r.sock")
    with bind_control(parse_control_url(path), sock_mode=0o660, owner=(-1, os.getgid())) as b:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
        assert b.mode == "oneshot"
    with bind_control(parse_control_url("cunix:" + path)) as b:
        assert b.mode == "stream"


def test_unix_bind_error(sockdir):
    path = os.path.join(sockdir, "nodir", "r.sock")
    with pytest.raises(ControlBindError, match="can't bind to a socket"):
        bind_control(parse_control_url(path))


# --------------------------------------------------------------------------
# cunix / tcp: persistent connections, lines


async def _persistent_lines(bound, family, handler, peer):
    addr = bound.sockname
    s = await stream_connect(addr, family)
    await s.send_all(b"V\nVF 20050322\nI")
    got = await read_exactly_lines(s, 2)
    assert got == b"20040107\n1\n"
    await s.send_all(b"\nX\n")
    got = await read_exactly_lines(s, 3)
    assert got == b"sessions created: 0\nactive sessions: 0\n0\n"
    # no cookie on streams; empty line is an (E5) command; CRLF tolerated
    await s.send_all(b"abc V\n\nV\r\nBOOM\nSILENT\nV\n")
    got = await read_exactly_lines(s, 5)
    assert got == b"E0\nE5\n20040107\nE5\n20040107\n"
    assert handler.calls[0] == (b"V", peer)
    assert handler.received == 10
    await s.aclose()


async def test_cunix_lines(nursery, handler, sockdir):
    path = os.path.join(sockdir, "c.sock")
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(f"cunix:{path}"))
        with bound:
            await start(nursery, bound, handler)
            await _persistent_lines(bound, socket.AF_UNIX, handler, "127.0.0.1")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "url, family, host",
    [("tcp:127.0.0.1:0", socket.AF_INET, "127.0.0.1"), ("tcp6:::1:0", socket.AF_INET6, "::1")],
)
async def test_tcp_lines(nursery, handler, url, family, host):
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(url))
        with bound:
            await start(nursery, bound, handler)
            await _persistent_lines(bound, family, handler, host)
            nursery.cancel_scope.cancel()


async def test_stream_overlong_line_closes(nursery, handler):
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url("tcp:127.0.0.1:0"))
        with bound:
            await start(nursery, bound, handler)
            s = await stream_connect(bound.sockname, socket.AF_INET)
            # an 8191-byte line is fine
            await s.send_all(b"V " + b"x" * 8189 + b"\n")
            assert await read_exactly_lines(s, 1) == b"E1\n"
            await s.send_all(b"V\n" + b"A" * 9000)
            assert await read_until_eof(s) == b"20040107\n"
            await s.aclose()
            # the server is still fine
            s = await stream_connect(bound.sockname, socket.AF_INET)
            await s.send_all(b"V\n")
            assert await read_exactly_lines(s, 1) == b"20040107\n"
            await s.aclose()
            nursery.cancel_scope.cancel()


async def test_stream_connection_cap_closes_the_idlest(nursery, handler, sockdir):
    """Full: a newcomer is served and the connection idle the longest is
    closed for it (rtpproxy would close the newcomer: 100 idle connections
    would lock the controllers out)."""
    path = os.path.join(sockdir, "c.sock")
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(f"cunix:{path}"))
        with bound:
            await start(nursery, bound, handler, max_connections=3)
            conns = []
            for _ in range(3):
                s = await stream_connect(path, socket.AF_UNIX)
                await s.send_all(b"V\n")
                assert await read_exactly_lines(s, 1) == b"20040107\n"
                conns.append(s)
            # conns[1] is the one idle the longest once conns[0] and [2] ran a command
            for c in (conns[0], conns[2]):
                await c.send_all(b"V\n")
                assert await read_exactly_lines(c, 1) == b"20040107\n"
            extra = await stream_connect(path, socket.AF_UNIX)
            await extra.send_all(b"V\n")
            assert await read_exactly_lines(extra, 1) == b"20040107\n"
            assert await read_until_eof(conns[1]) == b""  # evicted
            for c in (conns[0], conns[2], extra):  # the others still work
                await c.send_all(b"V\n")
                assert await read_exactly_lines(c, 1) == b"20040107\n"
            for c in conns + [extra]:
                await c.aclose()
            nursery.cancel_scope.cancel()


async def test_stream_connection_cap_when_all_are_busy(nursery, sockdir):
    """Every connection running a command: the newcomer is closed at once."""
    gate = trio.Event()

    class Slow:
        def note_received(self):
            pass

        def note_duplicate(self):
            pass

        async def handle(self, data, peer_host):
            await gate.wait()
            return b"0\n"

    path = os.path.join(sockdir, "b.sock")
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url(f"cunix:{path}"))
        with bound:
            await start(nursery, bound, Slow(), max_connections=2)
            conns = []
            for _ in range(2):
                s = await stream_connect(path, socket.AF_UNIX)
                await s.send_all(b"V\n")
                conns.append(s)
            await trio.testing.wait_all_tasks_blocked()
            extra = await stream_connect(path, socket.AF_UNIX)
            assert await read_until_eof(extra) == b""
            await extra.aclose()
            gate.set()
            for c in conns:
                assert await read_exactly_lines(c, 1) == b"0\n"
                await c.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# stdio


async def test_stdio(handler):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    eof = trio.Event()
    try:
        bound = bind_control(parse_control_url("stdioc:"), stdio_fds=(in_r, out_w))
        with trio.fail_after(TIMEOUT), bound:
            assert bound.mode == "stdio"
            async with trio.open_nursery() as nursery:
                await start(nursery, bound, handler, on_eof=eof.set)
                w = trio.lowlevel.FdStream(os.dup(in_w))
                r = trio.lowlevel.FdStream(os.dup(out_r))
                await w.send_all(b"V\nVF 2005")
                await w.send_all(b"0322\nI\n")
                assert await read_exactly_lines(r, 4) == (
                    b"20040107\n1\nsessions created: 0\nactive sessions: 0\n"
                )
                await w.send_all(b"X\nV")  # last line has no \n: dropped at EOF
                await w.aclose()
                os.close(in_w)
                in_w = None
                await eof.wait()
                assert await read_exactly_lines(r, 1) == b"0\n"
                await r.aclose()
            assert handler.received == 4
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd is not None:
                os.close(fd)


async def test_stdio_overlong_line_ends(handler):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    eof = trio.Event()
    try:
        bound = bind_control(parse_control_url("stdio:"), stdio_fds=(in_r, out_w))
        with trio.fail_after(TIMEOUT), bound:
            async with trio.open_nursery() as nursery:
                await start(nursery, bound, handler, on_eof=eof.set)
                w = trio.lowlevel.FdStream(os.dup(in_w))
                await w.send_all(b"V\n" + b"x" * 9000)
                await eof.wait()
                await w.aclose()
            assert os.read(out_r, 100) == b"20040107\n"
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


# --------------------------------------------------------------------------
# systemd


def test_systemd_listen_fd_checks(monkeypatch):
    pid = str(os.getpid())
    with pytest.raises(ControlBindError, match="not set"):
        systemd_listen_fd({})
    with pytest.raises(ControlBindError, match="not this process"):
        systemd_listen_fd({"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    with pytest.raises(ControlBindError, match="too many"):
        systemd_listen_fd({"LISTEN_PID": pid, "LISTEN_FDS": "2"})
    with pytest.raises(ControlBindError, match="no socket"):
        systemd_listen_fd({"LISTEN_PID": pid, "LISTEN_FDS": "0"})
    with pytest.raises(ControlBindError, match="bad"):
        systemd_listen_fd({"LISTEN_PID": "x", "LISTEN_FDS": "1"})


async def test_systemd_stream(nursery, handler, sockdir, monkeypatch):
    path = os.path.join(sockdir, "sd.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(5)
    fd = os.dup(lsock.fileno())
    lsock.close()
    monkeypatch.setattr(control, "SD_LISTEN_FDS_START", fd)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    with trio.fail_after(TIMEOUT):
        bound = bind_control(parse_control_url("systemd:"), environ=env)
        with bound:
            assert bound.mode == "stream" and bound.unlink_path is None
            await start(nursery, bound, handler)
            s = await stream_connect(path, socket.AF_UNIX)
            await s.send_all(b"V\nV\n")
            assert await read_exactly_lines(s, 2) == b"20040107\n20040107\n"
            await s.aclose()
            nursery.cancel_scope.cancel()


def test_systemd_not_listening(sockdir, monkeypatch):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.dup(s.fileno())
    s.close()
    monkeypatch.setattr(control, "SD_LISTEN_FDS_START", fd)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    try:
        with pytest.raises(ControlBindError, match="not a listening socket"):
            bind_control(parse_control_url("systemd:"), environ=env)
    finally:
        os.close(fd)


def test_bound_is_context_manager():
    with bind_control(parse_control_url("tcp:127.0.0.1:0")) as b:
        assert isinstance(b, BoundControl)
        assert b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert b.closed and b.sock.fileno() == -1
