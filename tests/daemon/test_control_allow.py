"""--control-allow over real loopback sockets: strangers get silence and a counter.

127.0.0.0/8 is all loopback on Linux: the relay listens on 127.0.0.1, the
allowed controller sends from 127.0.0.2, the stranger from 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from relayutil import settings

from pyrtpproxy.daemon import control, metrics
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.daemon.cli import build_config
from pyrtpproxy.daemon.config import ConfigError

ALLOWED = "127.0.0.2"


async def start(nursery, urls, allow):
    bound = [control.bind_control(control.parse_control_url(u)) for u in urls]
    server = Server(settings(control_allow=allow), bound)
    await nursery.start(server.run)
    return server, [b.sockname for b in bound]


async def udp_from(host: str, family=socket.AF_INET):
    s = trio.socket.socket(family, socket.SOCK_DGRAM)
    await s.bind((host, 0))
    return s


async def ask(s, addr, text: str) -> str:
    await s.sendto(text.encode(), addr)
    with trio.fail_after(5):
        return (await s.recv(65535)).decode()


def nothing_pending(s) -> bool:
    try:
        s._sock.recv(65535, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


async def test_udp_stranger_gets_silence_and_is_counted(nursery, caplog):
    caplog.set_level(logging.WARNING, "pyrtpproxy.control")
    server, (addr,) = await start(nursery, ["udp:127.0.0.1:0"], (f"{ALLOWED}/32",))
    ctl = await udp_from(ALLOWED)
    evil = await udp_from("127.0.0.1")
    assert await ask(ctl, addr, "c1 V") == "c1 20040107\n"
    for i in range(5):
        await evil.sendto(f"e{i} U stolen 127.0.0.1 30000 f".encode(), addr)
        await evil.sendto(f"e{i} X".encode(), addr)
    # the socket serves datagrams in order: the stranger's came first
    assert await ask(ctl, addr, "c2 Gv pyrtpp_ncmds_denied nsess_created") == (
        "c2 pyrtpp_ncmds_denied=10 nsess_created=0\n"
    )
    assert nothing_pending(evil)
    assert len(server.dispatcher.table) == 0
    info = await ask(ctl, addr, "c3 I")
    assert "\ncommands denied: 10\n" in info
    prom = metrics.render_prometheus(metrics.snapshot(server))
    assert "rtpproxy_pyrtpp_ncmds_denied_total 10" in prom
    denied_logs = [r for r in caplog.records if "refused by --control-allow" in r.getMessage()]
    assert len(denied_logs) == 1  # bounded rate
    assert "127.0.0.1" in denied_logs[0].getMessage()


async def test_udp6_and_v4_sockets(nursery):
    # the v6 socket only takes a network ::1 is not in; the v4 one 127.0.0.2
    server, (a4, a6) = await start(nursery, ["udp:127.0.0.1:0", "udp6:::1:0"], (f"{ALLOWED}/32", "fd00::/8"))
    ctl = await udp_from(ALLOWED)
    evil6 = await udp_from("::1", socket.AF_INET6)
    await evil6.sendto(b"e1 V", a6)
    assert await ask(ctl, a4, "c1 G pyrtpp_ncmds_denied") == "c1 1\n"
    assert nothing_pending(evil6)


async def test_udp6_allowed_source(nursery):
    server, (a6,) = await start(nursery, ["udp6:::1:0"], ("::1",))
    ok6 = await udp_from("::1", socket.AF_INET6)
    assert await ask(ok6, a6, "c1 V") == "c1 20040107\n"
    assert await ask(ok6, a6, "c2 G pyrtpp_ncmds_denied") == "c2 0\n"


async def _tcp_from(host: str, addr, family=socket.AF_INET):
    s = trio.socket.socket(family, socket.SOCK_STREAM)
    await s.bind((host, 0))
    await s.connect(addr)
    return trio.SocketStream(s)


async def test_tcp_stranger_is_closed_without_reply(nursery):
    server, (addr,) = await start(nursery, ["tcp:127.0.0.1:0"], (ALLOWED,))
    evil = await _tcp_from("127.0.0.1", addr)
    with trio.fail_after(5):
        try:
            await evil.send_all(b"X\n")
        except trio.BrokenResourceError:
            pass
        try:
            data = await evil.receive_some(100)
        except trio.BrokenResourceError:
            data = b""
    assert data == b""  # closed, nothing said
    ctl = await _tcp_from(ALLOWED, addr)
    with trio.fail_after(5):
        await ctl.send_all(b"V\nG pyrtpp_ncmds_denied\n")
        got = b""
        while got.count(b"\n") < 2:
            got += await ctl.receive_some(100)
    assert got == b"20040107\n1\n"


async def test_tcp6_allowed_and_refused(nursery):
    server, (a6,) = await start(nursery, ["tcp6:::1:0"], ("fd00::/8",))
    evil = await _tcp_from("::1", a6, socket.AF_INET6)
    with trio.fail_after(5):
        try:
            data = await evil.receive_some(100)
        except trio.BrokenResourceError:
            data = b""
    assert data == b""
    assert server.dispatcher.counters.pyrtpp_ncmds_denied == 1


async def test_without_option_everyone_is_served(nursery):
    server, (addr,) = await start(nursery, ["udp:127.0.0.1:0"], ())
    s = await udp_from("127.0.0.1")
    assert await ask(s, addr, "c1 G pyrtpp_ncmds_denied") == "c1 0\n"
    assert "denied" not in await ask(s, addr, "c2 I")


def test_denial_log_is_rate_limited(caplog):
    caplog.set_level(logging.WARNING, "pyrtpproxy.control")
    now = [100.0]
    counted = []
    allow = control.ControlAllow(("10.0.0.0/8",), lambda: counted.append(1), clock=lambda: now[0])
    assert allow.permits("10.1.2.3") and allow.permits("::ffff:10.1.2.3")
    assert not allow.permits("127.0.0.1") and not allow.permits("bogus")
    for _ in range(5):
        allow.deny("udp:127.0.0.1:22222", ("127.0.0.1", 5), "command")
    now[0] += control.ControlAllow.LOG_INTERVAL
    allow.deny("udp:127.0.0.1:22222", ("127.0.0.1", 5), "command")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "(4 more not logged)" in msgs[1]
    assert allow.denied == 6 and len(counted) == 6


class _FakeSock:
    def __init__(self, family, host):
        self.family, self._host = family, host

    def getsockname(self):
        return (self._host, 22222)


class _FakeBound:
    def __init__(self, family, host):
        self.sock = _FakeSock(family, host)
        self.spec = f"udp:{host}:22222"


def test_startup_warning_for_non_loopback_control_sockets():
    bound = [
        _FakeBound(socket.AF_INET, "0.0.0.0"),
        _FakeBound(socket.AF_INET, "192.0.2.7"),
        _FakeBound(socket.AF_INET6, "::"),
        _FakeBound(socket.AF_INET, "127.0.0.1"),
        _FakeBound(socket.AF_INET6, "::1"),
        _FakeBound(socket.AF_UNIX, "/run/rtpproxy.sock"),
    ]
    warnings = control.exposed_control_warnings(bound, None)
    assert len(warnings) == 3
    assert all("non-loopback" in w and "--control-allow" in w for w in warnings)
    assert control.exposed_control_warnings(bound, control.ControlAllow(("127.0.0.1",))) == []


def test_cli_control_allow():
    cfg = build_config(
        ["-fF", "-s", "udp:127.0.0.1:0", "--control-allow", "127.0.0.2,::1", "--control-allow=10.0.0.0/8"]
    )
    assert cfg.control_allow == ("127.0.0.2/32", "::1/128", "10.0.0.0/8")
    with pytest.raises(ConfigError, match="not an address"):
        build_config(["-fF", "--control-allow", "127.0.0.300"])
    with pytest.raises(ConfigError, match="empty"):
        build_config(["-fF", "--control-allow", "127.0.0.1,"])
