"""The synchronous fast path of the control plane (issue 15).

A handler's ``handle_now`` answers commands that never wait without a Trio
task switch; ``handle`` still serves the ones that wait, in arrival order.
"""

from __future__ import annotations

import socket
import threading

import attrs
import trio
import trio.testing

from pyrtpproxy.daemon.control import bind_control, parse_control_url, serve
from pyrtpproxy.media.engine import MediaEngine

TIMEOUT = 10


@attrs.define(eq=False)
class NowHandler:
    """``N…`` is answered by handle_now; ``W`` waits for ``gate`` in handle."""

    gate: trio.Event = attrs.Factory(trio.Event)
    now: list[bytes] = attrs.Factory(list)
    slow: list[bytes] = attrs.Factory(list)
    received: int = 0
    dups: int = 0

    def handle_now(self, data: bytes, peer_host: str | None) -> bytes | None:
        if not data.startswith(b"N"):
            return None
        self.now.append(data)
        return b"now " + data + b"\n"

    async def handle(self, data: bytes, peer_host: str | None) -> bytes:
        self.slow.append(data)
        if data == b"W":
            await self.gate.wait()
        return b"slow " + data + b"\n"

    def note_received(self) -> None:
        self.received += 1

    def note_duplicate(self) -> None:
        self.dups += 1


async def test_udp_burst_answered_once_each_in_order(nursery):
    h = NowHandler()
    with trio.fail_after(TIMEOUT), bind_control(parse_control_url("udp:127.0.0.1:0")) as bound:
        await nursery.start(lambda task_status: serve(bound, h, task_status=task_status))
        c = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await c.bind(("127.0.0.1", 0))
        # a burst the server reads in one wake-up; the third is a retransmission
        for payload in (b"k1 N1", b"k2 N2", b"k1 N1", b"k3 W", b"k4 N4"):
            await c.sendto(payload, bound.sockname)
        got = [(await c.recvfrom(100))[0] for _ in range(3)]
        assert got == [b"k1 now N1\n", b"k2 now N2\n", b"k1 now N1\n"]
        # W waits in handle(); N4, behind it, is not run before it is done
        await trio.testing.wait_all_tasks_blocked()
        assert h.now == [b"N1", b"N2"] and h.slow == [b"W"]
        h.gate.set()
        assert (await c.recvfrom(100))[0] == b"k3 slow W\n"
        assert (await c.recvfrom(100))[0] == b"k4 now N4\n"
        assert h.received == 4 and h.dups == 1
        c.close()
        nursery.cancel_scope.cancel()


async def test_stream_replies_before_a_waiting_command_go_out_first(nursery):
    h = NowHandler()
    with trio.fail_after(TIMEOUT), bind_control(parse_control_url("tcp:127.0.0.1:0")) as bound:
        await nursery.start(lambda task_status: serve(bound, h, task_status=task_status))
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await s.connect(bound.sockname)
        stream = trio.SocketStream(s)
        await stream.send_all(b"N1\nN2\nW\nN3\n")
        got = b""
        while got.count(b"\n") < 2:  # answered while W still waits
            got += await stream.receive_some(1000)
        assert got == b"now N1\nnow N2\n"
        h.gate.set()
        while got.count(b"\n") < 4:
            got += await stream.receive_some(1000)
        assert got == b"now N1\nnow N2\nslow W\nnow N3\n"
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_engine_post_runs_at_once_while_the_loop_is_idle():
    eng = MediaEngine()
    eng.start()
    try:
        ran: list[str] = []
        eng.post(lambda: ran.append(threading.current_thread().name))
        # no packets, no wake-up: done before post() returned, in this thread
        assert ran == [threading.current_thread().name]
    finally:
        eng.stop()


def test_engine_post_queues_while_the_loop_is_busy():
    eng = MediaEngine()
    eng.start()
    try:
        done = threading.Event()
        ran: list[str] = []
        with eng._idle:
            eng._busy = True  # as between two epoll_waits
        eng.post(lambda: (ran.append(threading.current_thread().name), done.set()))
        # queued and the eventfd written: the media thread runs it
        assert done.wait(TIMEOUT)
        assert ran == ["pyrtpproxy-media"]
    finally:
        eng.stop()


def test_engine_post_keeps_order_behind_queued_jobs():
    eng = MediaEngine()  # not started: call() only queues
    order: list[int] = []
    eng.call(order.append, 1)
    eng._thread = threading.current_thread()  # pretend the loop runs and is idle
    try:
        eng.post(order.append, 2)
    finally:
        eng._thread = None
    assert order == [1, 2]
    eng.stop()


async def test_dispatcher_handle_now_takes_only_commands_that_never_wait(nursery):
    from relayutil import start_relay

    relay = await start_relay(nursery)
    d = relay.dispatcher
    assert d.handle_now(b"V") == b"20040107\n"
    assert d.handle_now(b"U c 127.0.0.1 4000 f;1").endswith(b" 127.0.0.1\n")
    assert d.handle_now(b"Q c f;1 t;1") == b"60 0 0 0 0\n"
    assert d.handle_now(b"Q nosuchcall f;1 t;1") == b"E50\n"
    for waits in (b"R c f", b"P c p session f", b"S c f", b"C c x f", b"N c f", b""):
        assert d.handle_now(waits) is None
    d._lock = trio.Lock()
    async with d._lock:  # another command is running: wait for it
        assert d.handle_now(b"V") is None
    assert d.handle_now(b"D c f") == b"0\n"
    assert d.counters.ncmds_succd == 4 and d.counters.ncmds_errs == 1


@attrs.define(eq=False)
class CountingHandler(NowHandler):
    """Replies with how many commands were counted when it ran (a G counts itself)."""

    def handle_now(self, data: bytes, peer_host: str | None) -> bytes | None:
        if not data.startswith(b"N"):
            return None
        return b"%d\n" % self.received

    async def handle(self, data: bytes, peer_host: str | None) -> bytes:
        return b"%d\n" % self.received


async def test_unix_oneshot_counted_once_before_it_runs(nursery, tmp_path):
    h = CountingHandler()
    path = tmp_path / "ctl.sock"
    with trio.fail_after(TIMEOUT), bind_control(parse_control_url(f"unix:{path}")) as bound:
        await nursery.start(lambda task_status: serve(bound, h, task_status=task_status))
        got = []
        for cmd in (b"N1\n", b"S2\n", b"N3\n", b"S4\n"):  # fast path and task path
            # connect and send with no checkpoint between: the request is
            # there when the server accepts (its accept-time fast path)
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(str(path))
            raw.sendall(cmd)
            s = trio.socket.from_stdlib_socket(raw)
            reply = b""
            while chunk := await s.recv(100):
                reply += chunk
            s.close()
            got.append(reply)
        assert got == [b"1\n", b"2\n", b"3\n", b"4\n"]
        assert h.received == 4
        nursery.cancel_scope.cancel()
