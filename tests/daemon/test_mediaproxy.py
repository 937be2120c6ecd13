"""--mediaproxy: OpenSIPS's mediaproxy module's exchanges (spec mediaproxy.md
section 5) replayed byte for byte over the unix socket, with real media
between loopback peers."""

from __future__ import annotations

import json
import logging
import os
import re
import socket

import pytest
import trio

from pyrtpproxy.daemon import mediaproxy as MPD
from pyrtpproxy.daemon.app import Server
from tests.relayutil import Peer, rtp_packet, settings

REPLY = re.compile(rb"^127\.0\.0\.1((?: \d+)+)\r\n$")
PORT_MIN, PORT_MAX = 41000, 42998


def update(
    typ: str,
    call_id: str,
    cseq: int,
    from_tag: str,
    to_tag: str,
    media: str | None,
    *,
    dialog_id: str = "",
    from_uri: str = "a@127.0.0.1",
    to_uri: str = "b@127.0.0.1:5674",
    ua: str = "call.py",
) -> bytes:
    """An update exactly as OpenSIPS 3.4 writes it (spec 3.2, 5.1)."""
    lines = [
        "update",
        f"type: {typ}",
        f"dialog_id: {dialog_id}",
        f"call_id: {call_id}",
        f"cseq: {cseq}",
        f"from_uri: {from_uri}",
        f"to_uri: {to_uri}",
        f"from_tag: {from_tag}",
        f"to_tag: {to_tag}",
        f"user_agent: {ua}",
        "signaling_ip: 127.0.0.1",
        "media_relay: ",
    ]
    if media is not None:
        lines.append(f"media: {media}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def remove(call_id: str, from_tag: str, to_tag: str) -> bytes:
    return f"remove\r\ncall_id: {call_id}\r\nfrom_tag: {from_tag}\r\nto_tag: {to_tag}\r\n\r\n".encode()


def audio(port: int, ip: str = "127.0.0.1", direction: str = "sendrecv") -> str:
    return f"audio:{ip}:{port}:{direction}:ice=no"


class Conn:
    """One OpenSIPS process's persistent connection."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = b""

    async def ask(self, data: bytes) -> bytes:
        await self.sock.send(data)
        with trio.fail_after(5):
            while b"\r\n" not in self.buf:
                chunk = await self.sock.recv(8192)
                assert chunk, "connection closed"
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        assert self.buf == b"", "more than one reply line"
        return line + b"\r\n"

    def close(self) -> None:
        self.sock.close()


class MP:
    def __init__(self, server: Server, svc: MPD.MediaProxyService, path: str) -> None:
        self.server = server
        self.svc = svc
        self.path = path

    async def connect(self) -> Conn:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(self.path)
        return Conn(s)


async def start_mp(nursery, tmp_path, mi=None, clock=None, workers=0, **kw) -> MP:
    kw.setdefault("port_min", PORT_MIN)
    kw.setdefault("port_max", PORT_MAX)
    path = str(tmp_path / "dispatcher.sock")
    bound = MPD.bind_sockets([path])
    extra = {} if clock is None else {"clock": clock}
    if workers:
        extra["workers"] = workers
    server = Server(settings(**kw), [], **extra)
    svc = MPD.attach_service(server, bound, mi)
    await nursery.start(server.run)
    return MP(server, svc, path)


def ports_of(reply: bytes) -> list[int]:
    m = REPLY.match(reply)
    assert m, reply
    ports = [int(p) for p in m.group(1).split()]
    for p in ports:
        assert p == 0 or (PORT_MIN <= p <= PORT_MAX and p % 2 == 0), ports
    return ports


async def peers(n: int = 2) -> list[Peer]:
    return [await Peer().bind() for _ in range(n)]


async def check_media(mp: MP, a: Peer, a_port: int, b: Peer, b_port: int, n: int = 20, seq0: int = 1) -> None:
    """A sends to a_port (from the SDP A got), B to b_port; each packet arrives
    intact, from the relay port the receiver sends to."""
    for i in range(n):
        pa = rtp_packet(0x1111, seq0 + i)
        await a.send(pa, a_port)
        data, src = await b.recv()
        assert data == pa and src == ("127.0.0.1", b_port)
        pb = rtp_packet(0x2222, seq0 + i)
        await b.send(pb, b_port)
        data, src = await a.recv()
        assert data == pb and src == ("127.0.0.1", a_port)


def port_is_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


# ---- section 5.1: engage mode, basic call ------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
async def test_spec_5_1_engage_basic_call(nursery, tmp_path, workers):
    mp = await start_mp(nursery, tmp_path, workers=workers)
    a, b = await peers()
    c3, c4 = await mp.connect(), await mp.connect()
    cid = "cpy-1-c1d9a041bb0c@127.0.0.1"
    # the INVITE's update arrives on one process's connection ...
    r1 = await c4.ask(update("request", cid, 1, "a5707a6b", "", audio(a.port), dialog_id="5046852567894"))
    (b_port,) = ports_of(r1)  # goes into the INVITE B receives
    # ... the 200's on another's
    r2 = await c3.ask(
        update("reply", cid, 1, "a5707a6b", "1fa85093", audio(b.port), dialog_id="5046852567894")
    )
    (a_port,) = ports_of(r2)
    assert a_port != b_port
    await check_media(mp, a, a_port, b, b_port)
    stats = mp.svc.stats()
    assert stats["calls_active"] == 1 and stats["streams_active"] == 1
    assert await c4.ask(remove(cid, "a5707a6b", "1fa85093")) == b"removed\r\n"
    # the ports are free at once (a media worker process lets go of its
    # duplicates of the sockets a moment later)
    with trio.fail_after(2):
        while not (port_is_free(a_port) and port_is_free(b_port)):
            assert workers
            await trio.sleep(0.01)
    assert await c3.ask(remove(cid, "a5707a6b", "1fa85093")) == b"error\r\n"
    ended = mp.svc.stats()["ended"][-1]
    assert ended["call_id"] == cid and ended["timed_out"] is False
    (st,) = ended["streams"]
    assert st["caller_packets"] == 20 and st["callee_packets"] == 20
    assert st["caller_bytes"] == 20 * 172 and st["callee_bytes"] == 20 * 172
    assert st["caller_local"] == f"127.0.0.1:{a_port}" and st["callee_local"] == f"127.0.0.1:{b_port}"
    assert st["caller_remote"] == f"127.0.0.1:{a.port}" and st["callee_remote"] == f"127.0.0.1:{b.port}"
    assert ended["caller_ua"] == "call.py" and ended["from_uri"] == "a@127.0.0.1"
    assert mp.server.dispatcher.table.count == 0
    for c in (c3, c4):
        c.close()


# ---- section 5.2: use mode, 183, re-INVITEs from both sides, BYE from B ------------------
async def test_spec_5_2_use_mode_reinvites_both_sides(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    a, b = await peers()
    conns = [await mp.connect() for _ in range(3)]
    cid = "use-mode-1@127.0.0.1"
    ask = lambda i, data: conns[i % 3].ask(data)
    (b_port,) = ports_of(await ask(0, update("request", cid, 1, "A", "", audio(a.port))))
    # 183 with SDP: to_tag empty (spec 3.2)
    (a_port,) = ports_of(await ask(1, update("reply", cid, 1, "A", "", audio(b.port))))
    await check_media(mp, a, a_port, b, b_port, n=5)  # early media
    assert ports_of(await ask(2, update("reply", cid, 1, "A", "B", audio(b.port)))) == [a_port]
    # re-INVITE from A, and its 200
    assert ports_of(await ask(0, update("request", cid, 2, "A", "B", audio(a.port)))) == [b_port]
    assert ports_of(await ask(1, update("reply", cid, 2, "A", "B", audio(b.port)))) == [a_port]
    # re-INVITE from B: the tags and URIs swapped, B's own CSeq
    swap = {"from_uri": "b@127.0.0.1:5674", "to_uri": "a@127.0.0.1"}
    assert ports_of(await ask(2, update("request", cid, 101, "B", "A", audio(b.port), **swap))) == [a_port]
    assert ports_of(await ask(0, update("reply", cid, 101, "B", "A", audio(a.port), **swap))) == [b_port]
    await check_media(mp, a, a_port, b, b_port, n=10, seq0=100)
    # an old CSeq is ignored, the reply still names the ports
    assert ports_of(await ask(1, update("request", cid, 1, "A", "B", audio(a.port)))) == [b_port]
    # BYE from B in use mode: the message's own tags (spec 4, 5.2)
    assert await ask(2, remove(cid, "B", "A")) == b"removed\r\n"
    assert port_is_free(a_port) and port_is_free(b_port)
    for c in conns:
        c.close()


# ---- section 5.3: ICE, a disabled stream and a failed call -----------------------------
async def test_spec_5_3_disabled_stream_and_failed_call(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    c = await mp.connect()
    cid = "ice-probe-1@127.0.0.1"
    media = "audio:127.0.0.1:40000:sendrecv:ice=yes,video:127.0.0.1:0:sendrecv:ice=no"
    reply = await c.ask(update("request", cid, 1, "icetagA", "", media, dialog_id="7385041392545"))
    ports = ports_of(reply)
    assert len(ports) == 2 and ports[0] != 0 and ports[1] == 0
    # B answered 486: the dialog failed, the module removes it with B's tag
    assert await c.ask(remove(cid, "icetagA", "icetagB")) == b"removed\r\n"
    assert port_is_free(ports[0])
    assert mp.server.dispatcher.table.count == 0
    c.close()


async def test_answer_rejects_a_stream_and_several_streams_relay(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    a1, a2, b1, b2 = await peers(4)
    c = await mp.connect()
    cid = "multi@x"
    offer = f"{audio(a1.port)},video:127.0.0.1:{a2.port}:sendrecv:ice=no"
    b_ports = ports_of(await c.ask(update("request", cid, 1, "A", "", offer)))
    assert len(b_ports) == 2 and 0 not in b_ports
    answer = f"{audio(b1.port)},video:127.0.0.1:{b2.port}:sendrecv:ice=no"
    a_ports = ports_of(await c.ask(update("reply", cid, 1, "A", "B", answer)))
    await check_media(mp, a1, a_ports[0], b1, b_ports[0], n=3)
    await check_media(mp, a2, a_ports[1], b2, b_ports[1], n=3)
    # re-INVITE offering both; the answer disables the video: port 0, ports freed
    assert ports_of(await c.ask(update("request", cid, 2, "A", "B", offer))) == b_ports
    answer0 = f"{audio(b1.port)},video:127.0.0.1:0:sendrecv:ice=no"
    assert ports_of(await c.ask(update("reply", cid, 2, "A", "B", answer0))) == [a_ports[0], 0]
    assert port_is_free(a_ports[1]) and port_is_free(b_ports[1])
    await check_media(mp, a1, a_ports[0], b1, b_ports[0], n=3, seq0=50)
    assert await c.ask(remove(cid, "A", "B")) == b"removed\r\n"
    c.close()


async def test_reoffer_with_a_new_address_gets_new_ports(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    a, a_new, b = await peers(3)
    c = await mp.connect()
    cid = "move@x"
    (b_port,) = ports_of(await c.ask(update("request", cid, 1, "A", "", audio(a.port))))
    (a_port,) = ports_of(await c.ask(update("reply", cid, 1, "A", "B", audio(b.port))))
    # on hold (0.0.0.0) keeps the stream and its ports
    assert ports_of(await c.ask(update("request", cid, 2, "A", "B", audio(a.port, "0.0.0.0")))) == [b_port]
    assert ports_of(await c.ask(update("reply", cid, 2, "A", "B", audio(b.port, direction="recvonly")))) == [
        a_port
    ]
    # A moves to another address: a new stream with new ports
    (b_port2,) = ports_of(await c.ask(update("request", cid, 3, "A", "B", audio(a_new.port))))
    assert b_port2 != b_port
    (a_port2,) = ports_of(await c.ask(update("reply", cid, 3, "A", "B", audio(b.port))))
    assert a_port2 != a_port
    # the old stream is closed once the new one is answered
    assert port_is_free(a_port) and port_is_free(b_port)
    await check_media(mp, a_new, a_port2, b, b_port2, n=3)
    assert await c.ask(remove(cid, "A", "B")) == b"removed\r\n"
    c.close()


# ---- latching: a stranger can neither listen in nor take a call over ------------------------
@pytest.mark.parametrize(
    "learning",
    [
        {},
        # the engine's endpoint-learning policy applies to MediaProxy calls too
        # (delayed relays strangers during its learning window, off accepts the
        # SDP host: on loopback the stranger is that host, so they are left out)
        {"endpoint_learning": "heuristic"},
        {"strict_source": True},
    ],
)
async def test_stranger_cannot_take_over_a_latched_call(nursery, tmp_path, learning):
    mp = await start_mp(nursery, tmp_path, **learning)
    a, b, evil = await peers(3)
    c = await mp.connect()
    cid = "latch@x"
    (b_port,) = ports_of(await c.ask(update("request", cid, 1, "A", "", audio(a.port))))
    (a_port,) = ports_of(await c.ask(update("reply", cid, 1, "A", "B", audio(b.port))))
    await check_media(mp, a, a_port, b, b_port, n=3)
    # the update window of the last update must have passed for a strict latch:
    # move the streams' last update back (as if it happened 20 s ago)
    for s in mp.server.dispatcher.table:
        for st in s.streams():
            st.last_update -= 20
    await mp.server.engine.barrier()
    await evil.send(rtp_packet(0x6666, 7), b_port)
    await evil.send(rtp_packet(0x6666, 8), a_port)
    await a.expect_nothing(_R(mp))
    await b.expect_nothing(_R(mp))
    await check_media(mp, a, a_port, b, b_port, n=3, seq0=10)
    await evil.expect_nothing(_R(mp))
    c.close()


class _R:
    def __init__(self, mp: MP) -> None:
        self.mp = mp

    async def barrier(self) -> None:
        await self.mp.server.engine.barrier()


# ---- many connections ---------------------------------------------------------------------
async def test_many_connections_many_calls(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    n = 24
    conns = [await mp.connect() for _ in range(n)]

    async def call(i: int) -> None:
        a, b = await peers()
        cid = f"many-{i}@x"
        (b_port,) = ports_of(await conns[i].ask(update("request", cid, 1, f"a{i}", "", audio(a.port))))
        (a_port,) = ports_of(
            await conns[(i + 1) % n].ask(update("reply", cid, 1, f"a{i}", f"b{i}", audio(b.port)))
        )
        await check_media(mp, a, a_port, b, b_port, n=3)
        assert await conns[(i + 2) % n].ask(remove(cid, f"a{i}", f"b{i}")) == b"removed\r\n"
        a.close()
        b.close()

    # one request at a time per connection (no pipelining, as OpenSIPS): run the
    # calls in groups so that no two tasks use one connection at once
    for group in range(3):
        async with trio.open_nursery() as inner:
            for i in range(group, n, 3):
                inner.start_soon(call, i)
    assert mp.svc.stats()["calls_ended"] == n
    assert mp.server.dispatcher.table.count == 0
    for c in conns:
        c.close()


# ---- bad input --------------------------------------------------------------------------------
async def test_bad_requests_get_error(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    c = await mp.connect()
    assert await c.ask(b"update\r\ntype: request\r\ncall_id: x\r\n\r\n") == b"error\r\n"
    assert await c.ask(b"bogus\r\ncall_id: x\r\n\r\n") == b"error\r\n"
    assert await c.ask(update("request", "x", 1, "A", "", "audio:1.2.3:5:sendrecv")) == b"error\r\n"
    assert await c.ask(remove("nosuch", "A", "B")) == b"error\r\n"
    # a reply for an unknown call without SDP: MediaProxy answers None
    assert await c.ask(update("reply", "nosuch", 1, "A", "B", None)) == b"None\r\n"
    # the connection still works
    assert (await c.ask(b"\r\nversion\r\n")).startswith(b'"')
    # a request that never ends is cut off
    await c.sock.send(b"update\r\n" + b"x: " + b"y" * 40000 + b"\r\n")
    with trio.fail_after(5):
        while await c.sock.recv(100):
            pass
    c.close()
    assert mp.server.dispatcher.table.count == 0


# ---- operators: summary, sessions, /stats -------------------------------------------------------
async def test_summary_sessions_and_stats(nursery, tmp_path):
    mp = await start_mp(nursery, tmp_path)
    a, b = await peers()
    c = await mp.connect()
    (b_port,) = ports_of(await c.ask(update("request", "ops@x", 1, "A", "", audio(a.port))))
    (a_port,) = ports_of(await c.ask(update("reply", "ops@x", 1, "A", "B", audio(b.port))))
    await check_media(mp, a, a_port, b, b_port, n=2)
    summary = json.loads(await c.ask(b"summary\r\n"))
    assert summary[0]["session_count"] == 1 and summary[0]["stream_count"] == {"audio": 1}
    assert summary[0]["status"] == "active"
    sessions = json.loads(await c.ask(b"sessions\r\n"))
    assert sessions[0]["call_id"] == "ops@x" and sessions[0]["streams"][0]["caller_packets"] == 2
    from pyrtpproxy.daemon.metrics import render_json, render_prometheus, snapshot

    snap = snapshot(mp.server)
    doc = json.loads(render_json(snap))
    assert doc["mediaproxy"]["calls_active"] == 1
    assert doc["mediaproxy"]["calls"][0]["streams"][0]["callee_bytes"] == 2 * 172
    assert "rtpproxy_mediaproxy_calls_active 1" in render_prometheus(snap)
    c.close()


# ---- media timeout ends the dialog over OpenSIPS's MI --------------------------------------------
class FakeMI:
    """OpenSIPS's mi_datagram socket: records requests, answers like 3.4."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        raw = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(path if kind == "unix" else ("127.0.0.1", 0))
        self.addr = path if kind == "unix" else raw.getsockname()
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.requests: list[dict] = []
        self.got = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            data, addr = await self.sock.recvfrom(65536)
            req = json.loads(data)
            self.requests.append(req)
            self.got.set()
            if addr:
                answer = {"jsonrpc": "2.0", "result": "OK", "id": req["id"]}
                await self.sock.sendto(json.dumps(answer).encode(), addr)


@pytest.mark.parametrize("kind", ["unix", "udp"])
async def test_media_timeout_ends_the_dialog(nursery, tmp_path, autojump_clock, caplog, kind):
    caplog.set_level(logging.INFO, logger="pyrtpproxy.mediaproxy")
    mi = FakeMI(kind, str(tmp_path / "opensips.mi"))
    await nursery.start(mi.run)
    mp = await start_mp(nursery, tmp_path, mi=(kind, mi.addr), clock=trio.current_time, ttl=30, setup_ttl=30)
    a, b = await peers()
    c = await mp.connect()
    cid = "timeout@x"
    dialog_id = "14955689039161"  # the spec's example: dlg_list ID a9d.93558842
    (b_port,) = ports_of(await c.ask(update("request", cid, 1, "A", "", audio(a.port), dialog_id=dialog_id)))
    ports_of(await c.ask(update("reply", cid, 1, "A", "B", audio(b.port), dialog_id=dialog_id)))
    # a use-mode call (no dialog_id) that times out too: accounting only
    ports_of(await c.ask(update("request", "use@x", 1, "U", "", audio(a.port))))
    ports_of(await c.ask(update("reply", "use@x", 1, "U", "V", audio(b.port))))
    await trio.sleep(31)
    with trio.fail_after(5):
        await mi.got.wait()
    assert len(mi.requests) == 1
    req = mi.requests[0]
    assert req["method"] == "dlg_end_dlg" and req["params"] == ["a9d.93558842"] and req["jsonrpc"] == "2.0"
    st = mp.svc.stats()
    assert st["calls_timed_out"] == 2 and st["calls_active"] == 0
    ended = {e["call_id"]: e for e in st["ended"]}
    assert ended[cid]["timed_out"] is True and ended[cid]["streams"][0]["status"] == "no-traffic timeout"
    assert port_is_free(b_port)
    # OpenSIPS ends the dialog: BYEs, then the module's remove gets "removed"
    assert await c.ask(remove(cid, "A", "B")) == b"removed\r\n"
    assert any("call expired" in r.getMessage() and cid in r.getMessage() for r in caplog.records)
    c.close()


# ---- the command line -------------------------------------------------------------------------------
def test_cli_mediaproxy_options():
    from pyrtpproxy.daemon.cli import build_config
    from pyrtpproxy.daemon.config import ConfigError

    cfg = build_config(["-F", "--mediaproxy", "unix:", "--mediaproxy", "/tmp/x.sock"])
    assert cfg.mediaproxy_sockets == (MPD.DEFAULT_SOCKET, "/tmp/x.sock")
    assert cfg.control_sockets == ()  # no rtpproxy socket unless -s is given
    assert cfg.mediaproxy_mi == "unix:/run/opensips/socket"
    cfg = build_config(
        ["-F", "-s", "udp:127.0.0.1:2000", "--mediaproxy=unix:rel.sock", "--mediaproxy-mi", "none"]
    )
    assert cfg.control_sockets == ("udp:127.0.0.1:2000",)
    assert cfg.mediaproxy_sockets == (os.path.abspath("rel.sock"),)
    assert cfg.mediaproxy_mi is None
    cfg = build_config(["-F", "--mediaproxy-mi", "udp:127.0.0.1:8080"])
    assert cfg.mediaproxy_sockets == () and cfg.control_sockets == ("unix:/var/run/rtpproxy.sock",)
    with pytest.raises(ConfigError):
        build_config(["-F", "--mediaproxy-mi", "udp:nohost"])
    with pytest.raises(ConfigError):
        build_config(["-F", "--mediaproxy", "unix:" + "x" * 200])


async def test_setup_ttl_until_the_answer(nursery, tmp_path, autojump_clock):
    mp = await start_mp(nursery, tmp_path, clock=trio.current_time, ttl=60, setup_ttl=20)
    c = await mp.connect()
    ports_of(await c.ask(update("request", "ring@x", 1, "A", "", audio(40000))))
    ports_of(await c.ask(update("request", "ans@x", 1, "A", "", audio(40000))))
    await trio.sleep(10)
    ports_of(await c.ask(update("reply", "ans@x", 1, "A", "B", audio(40002))))
    await trio.sleep(15)  # 25 s: the unanswered call is gone (-W), the answered one not (-T)
    st = mp.svc.stats()
    assert [x["call_id"] for x in st["calls"]] == ["ans@x"]
    assert st["ended"][-1]["call_id"] == "ring@x" and st["ended"][-1]["timed_out"] is True
    c.close()


async def test_unreachable_mi_is_logged_and_counted(nursery, tmp_path, autojump_clock):
    mp = await start_mp(
        nursery, tmp_path, mi=("unix", str(tmp_path / "nobody")), clock=trio.current_time, ttl=5, setup_ttl=5
    )
    c = await mp.connect()
    ports_of(await c.ask(update("request", "mi@x", 1, "A", "", audio(40000), dialog_id="42")))
    ports_of(await c.ask(update("reply", "mi@x", 1, "A", "B", audio(40002), dialog_id="42")))
    with trio.fail_after(30):
        while mp.svc.totals.mi_failed == 0:
            await trio.sleep(1)
    assert mp.svc.stats()["calls_timed_out"] == 1 and mp.svc.totals.dialogs_ended == 0
    c.close()


async def test_reply_address_wildcard_and_advertised(nursery, tmp_path):
    from pyrtpproxy.daemon.dispatcher import Iface

    # -l * : bind on the address that routes towards the party, answer it
    mp = await start_mp(nursery, tmp_path, ifaces=(Iface(socket.AF_INET, None),))
    c = await mp.connect()
    a, b = await peers()
    (b_port,) = ports_of(await c.ask(update("request", "wild@x", 1, "A", "", audio(a.port))))
    (a_port,) = ports_of(await c.ask(update("reply", "wild@x", 1, "A", "B", audio(b.port))))
    await check_media(mp, a, a_port, b, b_port, n=3)
    c.close()
    # -l 127.0.0.1=203.0.113.5 (advertised address): the reply names it
    (tmp_path / "adv").mkdir()
    mp2 = await start_mp(
        nursery, tmp_path / "adv", ifaces=(Iface(socket.AF_INET, "127.0.0.1", "203.0.113.5"),)
    )
    c2 = await mp2.connect()
    reply = await c2.ask(update("request", "adv@x", 1, "A", "", audio(a.port)))
    assert re.match(rb"^203\.0\.113\.5 \d+\r\n$", reply), reply
    c2.close()


async def test_record_all_records_mediaproxy_calls(nursery, tmp_path):
    """-a: a MediaProxy call's streams are sessions like any other, so they are recorded."""
    from pyrtpproxy.media.recorder import RecOptions
    from pyrtpproxy.media.recorder import attach as attach_recorder

    rd = tmp_path / "rec"
    rd.mkdir()
    path = str(tmp_path / "dispatcher.sock")
    server = Server(settings(port_min=PORT_MIN, port_max=PORT_MAX), [])
    rec = attach_recorder(server, RecOptions(record_dir=str(rd), record_all=True))
    svc = MPD.attach_service(server, MPD.bind_sockets([path]), None)
    await nursery.start(server.run)
    mp = MP(server, svc, path)
    a, b = await peers()
    c = await mp.connect()
    (b_port,) = ports_of(await c.ask(update("request", "rec@x", 1, "A", "", audio(a.port))))
    (a_port,) = ports_of(await c.ask(update("reply", "rec@x", 1, "A", "B", audio(b.port))))
    await check_media(mp, a, a_port, b, b_port, n=4)
    assert await c.ask(remove("rec@x", "A", "B")) == b"removed\r\n"
    await rec.sync()
    names = sorted(p.name for p in rd.iterdir())
    assert names and all(n.startswith("rec@x=A") for n in names), names
    assert any(n.endswith(".rtp") and (rd / n).stat().st_size > 4 * 172 for n in names), names
    c.close()
