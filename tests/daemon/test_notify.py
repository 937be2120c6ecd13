"""Timeout notifications (-n): real UNIX and TCP listeners, Trio's MockClock."""

from __future__ import annotations

import logging
import socket

import trio
from relayutil import Relay, settings

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.daemon.notifier import Notifier, attach_notifier, match_target, parse_target


# ---------------------------------------------------------------- helpers
class Listener:
    """A SIP server's notification socket: collects lines per connection."""

    def __init__(self, sock: trio.socket.SocketType, *, close_after: int | None = None) -> None:
        self.sock = sock
        self.send, self.recv = trio.open_memory_channel(1000)
        self.nconns = 0
        self.close_after = close_after  # close each connection after N lines

    @classmethod
    async def unix(cls, path, **kw) -> Listener:
        # stdlib bind: trio binds UNIX paths in a worker thread, and the
        # autojump clock would move on while it runs
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.bind(str(path))
        raw.listen(8)
        return cls(trio.socket.from_stdlib_socket(raw), **kw)

    @classmethod
    async def tcp(cls, **kw) -> Listener:
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await s.bind(("127.0.0.1", 0))
        s.listen(8)
        return cls(s, **kw)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            task_status.started()
            while True:
                conn, _ = await self.sock.accept()
                self.nconns += 1
                n.start_soon(self._conn, conn, self.nconns)

    async def _conn(self, conn, idx: int) -> None:
        buf = b""
        nlines = 0
        with conn:
            while True:
                data = await conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    await self.send.send((idx, line.decode()))
                    nlines += 1
                    if self.close_after is not None and nlines >= self.close_after:
                        return

    async def line(self, timeout: float = 100) -> tuple[int, str]:
        with trio.fail_after(timeout):
            return await self.recv.receive()

    def pending(self) -> list:
        out = []
        while True:
            try:
                out.append(self.recv.receive_nowait())
            except trio.WouldBlock:
                return out


def trio_clock():
    """Trio's (mock) clock for session TTLs; the media thread, which can't
    read it, gets the last value the Trio thread saw."""
    last = [trio.current_time()]

    def clock() -> float:
        try:
            last[0] = trio.current_time()
        except RuntimeError:
            pass
        return last[0]

    return clock


async def start(nursery, targets, clock=None, nkw=None, **kw):
    if clock is trio.current_time:
        clock = trio_clock()
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    extra = {} if clock is None else {"clock": clock}
    server = Server(settings(notify_targets=tuple(targets), **kw), [b], **extra)
    n = attach_notifier(server, **(nkw or {}))
    await nursery.start(server.run)
    return Relay(server, b.sockname), n


# ---------------------------------------------------------------- pure parts
def test_match_target_rules():
    t = ("unix:/run/k.sock", "tcp:127.0.0.1:9999", "tcp:%%CC_SELF%%:7000")
    assert match_target("unix:/run/k.sock", t) == "unix:/run/k.sock"
    assert match_target("/run/k.sock", t) == "unix:/run/k.sock"  # 1.x/2.0 bare path
    assert match_target("tcp:127.0.0.1:9999", t) == "tcp:127.0.0.1:9999"
    assert match_target("127.0.0.1:9999", t) == "tcp:127.0.0.1:9999"  # OpenSIPS#1043
    assert match_target("tcp:%%CC_SELF%%:7000", t) == "tcp:%%CC_SELF%%:7000"
    assert match_target("ttag;1", t) is None  # Kamailio's 7-argument trap
    assert match_target("unix:/run/other.sock", t) is None
    assert match_target("tcp:127.0.0.1:9998", t) is None
    assert match_target("unix:127.0.0.1:9999", t) is None
    assert parse_target("/x").text == "unix:/x"
    assert parse_target("tcp:%%CC_SELF%%:7000").wildcard


# ---------------------------------------------------------------- end to end
async def test_unix_listener_gets_tags_after_setup_timeout(nursery, autojump_clock, tmp_path):
    path = tmp_path / "n.sock"
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=20, setup_ttl=10)
    t0 = trio.current_time()
    # 7 arguments: from-tag, notify socket, notify tag (URL-decoded)
    assert (await relay.cmd(f"U c1 127.0.0.1 30000 f1 unix:{path} tag5")).split()[0].isdigit()
    assert (await relay.cmd(f"U c2 127.0.0.1 30000 f2 {path} tag%20one")).split()[0].isdigit()  # bare path
    assert await lis.line() == (1, "tag5")
    assert 10 <= trio.current_time() - t0 <= 11.5
    assert await lis.line() == (1, "tag one")  # the same connection, reused
    assert lis.nconns == 1
    assert await relay.cmd("G nsess_timeout") == "2"
    assert n.sent == 2 and n.dropped == 0


async def test_tcp_listener_gets_tag_after_media_timeout(nursery, autojump_clock):
    lis = await Listener.tcp()
    await nursery.start(lis.serve)
    target = f"tcp:127.0.0.1:{lis.port}"
    relay, n = await start(nursery, [target], clock=trio.current_time, ttl=20, setup_ttl=10)
    t0 = trio.current_time()
    # OpenSIPS's 8 arguments: to-tag, then socket and tag
    await relay.cmd(f"U c1 127.0.0.1 30000 f t {target} T123.456")
    await relay.cmd("L c1 127.0.0.1 30002 f t")  # complete: -T applies
    assert await lis.line() == (1, "T123.456")
    assert 20 <= trio.current_time() - t0 <= 21.5


async def test_cc_self_uses_the_controllers_address(nursery, autojump_clock):
    lis = await Listener.tcp()
    await nursery.start(lis.serve)
    wild = f"tcp:%%CC_SELF%%:{lis.port}"
    relay, n = await start(nursery, [wild], clock=trio.current_time, ttl=5, setup_ttl=5)
    assert await relay.cmd("VF 20150617") == "1"
    await relay.cmd(f"U c1 127.0.0.1 30000 f t {wild} 17.42")
    assert await lis.line() == (1, "17.42")
    assert list(n.targets) == [f"tcp:127.0.0.1:{lis.port}"]


async def test_no_notification_for_d_or_x(nursery, autojump_clock, tmp_path):
    path = tmp_path / "n.sock"
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    await relay.cmd(f"U d1 127.0.0.1 30000 f unix:{path} deleted")
    await relay.cmd(f"U x1 127.0.0.1 30000 f unix:{path} xed")
    assert await relay.cmd("D d1 f") == "0"
    assert await relay.cmd("X") == "0"
    await relay.cmd(f"U o1 127.0.0.1 30000 f unix:{path} timedout")
    assert await lis.line() == (1, "timedout")  # the first and only line
    await trio.sleep(30)
    assert lis.pending() == []
    assert n.queued == 1


async def test_later_u_without_notify_args_turns_it_off(nursery, autojump_clock, tmp_path):
    path = tmp_path / "n.sock"
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    await relay.cmd(f"U off 127.0.0.1 30000 f unix:{path} off-tag")
    await relay.cmd("U off 127.0.0.1 30000 f")
    await relay.cmd(f"U on 127.0.0.1 30000 f unix:{path} on-tag")
    assert await lis.line() == (1, "on-tag")
    await trio.sleep(30)
    assert lis.pending() == []


async def test_kamailio_seven_argument_form(nursery, autojump_clock, tmp_path, caplog):
    """U call ip port ftag;1 ttag;1 <timeout_socket>: rtpproxy >= 2.0 takes
    ttag;1 as the socket name: logged, no notification, to-tag ignored."""
    path = tmp_path / "k.sock"
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    caplog.set_level(logging.ERROR, logger="pyrtpproxy")
    reply = await relay.cmd(f"U kc 127.0.0.1 30000 ftag;1 ttag;1 unix:{path}")
    assert reply.split()[0].isdigit()
    assert "invalid socket name ttag;1" in caplog.text
    # the session is keyed on the from-tag only; the to-tag was not stored
    assert (await relay.cmd("Q kc ftag;1")).split()[0].isdigit()
    await relay.cmd(f"U ok 127.0.0.1 30000 f unix:{path} proper")
    assert await lis.line() == (1, "proper")
    await trio.sleep(30)
    assert lis.pending() == []
    assert await relay.cmd("G nsess_timeout") == "2"


async def test_unknown_target_is_logged_and_ignored(nursery, autojump_clock, tmp_path, caplog):
    path = tmp_path / "n.sock"
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    caplog.set_level(logging.ERROR, logger="pyrtpproxy")
    reply = await relay.cmd("U u1 127.0.0.1 30000 f unix:/run/nonexist.sock tag")
    assert reply.split()[0].isdigit()
    assert "invalid socket name unix:/run/nonexist.sock" in caplog.text
    await trio.sleep(10)
    assert await relay.cmd("G nsess_timeout") == "1"
    assert n.queued == 0


async def test_vf_and_e75_follow_minus_n(nursery, tmp_path):
    relay, n = await start(nursery, [])
    assert n is None
    assert await relay.cmd("VF 20081224") == "0"
    assert await relay.cmd("VF 20150617") == "1"  # only 20081224 follows -n
    assert await relay.cmd("U e 127.0.0.1 30000 f unix:/x tag") == "E75"
    assert await relay.cmd("U e 127.0.0.1 30000 f t unix:/x tag") == "E75"
    relay2, n2 = await start(nursery, [f"unix:{tmp_path}/n.sock"])
    assert await relay2.cmd("VF 20081224") == "1"
    assert await relay2.cmd("U e 127.0.0.1 30000 f unix:/x bad%zzenc") == "E10"


async def test_reconnects_when_the_listener_closed_the_connection(nursery, autojump_clock, tmp_path):
    path = tmp_path / "n.sock"
    lis = await Listener.unix(path, close_after=1)
    await nursery.start(lis.serve)
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    await relay.cmd(f"U r1 127.0.0.1 30000 f unix:{path} first")
    assert await lis.line() == (1, "first")
    await trio.sleep(10)  # the listener has closed its end meanwhile
    await relay.cmd(f"U r2 127.0.0.1 30000 f unix:{path} second")
    assert await lis.line() == (2, "second")
    assert n.sent == 2 and n.dropped == 0


async def test_listener_coming_up_late_gets_the_retried_tag(nursery, autojump_clock, tmp_path):
    path = tmp_path / "late.sock"
    relay, n = await start(
        nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5, nkw={"backoff_min": 1.0}
    )
    await relay.cmd(f"U l1 127.0.0.1 30000 f unix:{path} late")
    with trio.fail_after(60):
        await n.wait_for(lambda: n.targets and next(iter(n.targets.values())).failures >= 1)
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    assert await lis.line() == (1, "late")
    assert n.dropped == 0


async def test_undeliverable_tag_is_dropped_after_retries(nursery, autojump_clock, tmp_path):
    path = tmp_path / "never.sock"
    relay, n = await start(nursery, [f"unix:{path}"], clock=trio.current_time, ttl=5, setup_ttl=5)
    await relay.cmd(f"U g1 127.0.0.1 30000 f unix:{path} lost")
    with trio.fail_after(60):
        await n.wait_for(lambda: n.dropped == 1)
    t = n.targets[f"unix:{path}"]
    assert t.failures == 4  # the first try and 3 retries
    assert n.pending == 0


async def test_bounded_queue_drops_oldest(nursery, tmp_path):
    path = tmp_path / "q.sock"
    lis = await Listener.unix(path)
    await nursery.start(lis.serve)
    n = Notifier([f"unix:{path}"], queue_max=3)
    await nursery.start(n.run)
    for i in range(10):  # all queued before the target task runs once
        assert n.enqueue(str(path), b"m%d\n" % i)
    assert n.dropped == 7 and n.queued == 10 and n.pending == 3
    got = [await lis.line(5) for _ in range(3)]
    assert got == [(1, "m7"), (1, "m8"), (1, "m9")]
    with trio.fail_after(5):
        await n.wait_for(lambda: n.pending == 0)
    assert n.sent == 3


async def test_slow_listener_does_not_slow_commands(nursery, tmp_path):
    """A listener that accepts and never reads: the notifier's writes block
    and time out, its queue overflows (counted), commands stay fast."""
    path = tmp_path / "slow.sock"
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await lsock.bind(str(path))
    lsock.listen(8)
    held = []

    async def accept_and_hold():
        while True:
            conn, _ = await lsock.accept()
            held.append(conn)  # never read

    nursery.start_soon(accept_and_hold)
    relay, n = await start(
        nursery,
        [f"unix:{path}"],
        ttl=1,
        setup_ttl=1,
        nkw={"queue_max": 20, "write_timeout": 0.5, "backoff_min": 0.05},
    )
    tag = "x" * 4000
    with trio.fail_after(30):
        for i in range(150):
            await relay.cmd(f"U s{i} 127.0.0.1 30000 f unix:{path} {tag}{i}")
        await n.wait_for(lambda: n.queued == 150)  # every session timed out
        worst = 0.0
        for i in range(50):
            t = trio.current_time()
            assert await relay.cmd("V") == "20040107"
            assert (await relay.cmd(f"U v{i} 127.0.0.1 30000 f")).split()[0].isdigit()
            worst = max(worst, trio.current_time() - t)
        assert worst < 0.5
        assert n.dropped > 0
        assert int(await relay.cmd("G nsess_timeout")) >= 150


async def test_refused_target_does_not_slow_commands(nursery):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    target = f"tcp:127.0.0.1:{port}"
    relay, n = await start(
        nursery, [target], ttl=1, setup_ttl=1, nkw={"queue_max": 5, "backoff_min": 0.01, "backoff_max": 0.05}
    )
    with trio.fail_after(30):
        for i in range(30):
            await relay.cmd(f"U r{i} 127.0.0.1 30000 f t {target} T{i}")
        await n.wait_for(lambda: n.queued == 30)
        t = trio.current_time()
        for _ in range(50):
            assert await relay.cmd("V") == "20040107"
        assert trio.current_time() - t < 2.0
        await n.wait_for(lambda: n.dropped == 30)
    assert n.sent == 0
