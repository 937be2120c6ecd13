"""Command-rate client: a fixed number of commands in flight over udp, unix or tcp.

One thread and one ``select.epoll`` drive ``inflight`` slots (Kamailio's
worker processes, each waiting for its reply before it sends the next
command), so the client stays cheap next to the relay it measures:

* ``udp``: a connected datagram socket per slot, ``COOKIE COMMAND``
  requests; a request without an answer within ``timeout`` is resent with the
  same cookie (counted in ``resent``);
* ``tcp``: a persistent connection per slot (rtpproxy's ``tcp:`` control),
  ``COMMAND\\n`` lines, one reply line each;
* ``unix``: rtpproxy's ``unix:`` one-shot socket: a new connection per
  command, the reply is everything until the relay closes it.

Each command's latency runs from its (first) send to its reply.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from dataclasses import dataclass

TRANSPORTS = ("udp", "unix", "tcp")


@dataclass
class RateResult:
    transport: str
    name: str
    inflight: int
    replies: list[str | None]
    latencies_ns: list[int]
    elapsed: float
    errors: int = 0
    timeouts: int = 0
    resent: int = 0

    def summary(self) -> dict:
        lat = sorted(self.latencies_ns)

        def p(q: float) -> float | None:
            if not lat:
                return None
            k = min(len(lat) - 1, max(0, round(q / 100 * (len(lat) - 1))))
            return round(lat[k] / 1e6, 3)

        n = len(self.replies)
        return {
            "cmds": n,
            "inflight": self.inflight,
            "elapsed_s": round(self.elapsed, 4),
            "rate_per_s": round(n / self.elapsed, 1) if self.elapsed > 0 else None,
            "lat_p50_ms": p(50),
            "lat_p99_ms": p(99),
            "lat_max_ms": round(lat[-1] / 1e6, 3) if lat else None,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "resent": self.resent,
        }


class _Slot:
    __slots__ = ("sock", "idx", "t0", "deadline", "buf", "cookie", "data", "tries")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.idx = -1
        self.t0 = 0
        self.deadline = 0.0
        self.buf = b""
        self.cookie = b""
        self.data = b""
        self.tries = 0


def run_commands(
    transport: str,
    target: tuple[str, int] | str,
    commands: list[str],
    inflight: int = 8,
    *,
    name: str = "",
    timeout: float = 2.0,
    retries: int = 4,
) -> RateResult:
    """Run ``commands`` with ``inflight`` outstanding at any time; replies in command order."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    n = len(commands)
    inflight = max(1, min(inflight, n or 1))
    replies: list[str | None] = [None] * n
    lats: list[int] = []
    res = RateResult(transport, name, inflight, replies, lats, 0.0)
    ep = select.epoll()
    slots = [_Slot() for _ in range(inflight)]
    by_fd: dict[int, _Slot] = {}
    prefix = f"{os.getpid()}x{id(res) & 0xFFFF:x}_".encode()
    nxt = 0
    done = 0

    def open_stream() -> socket.socket:
        if transport == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A local listener accepts at once; one whose backlog stays full (a
        # wedged relay) must not hang the harness.
        s.settimeout(timeout)
        s.connect(target)
        s.setblocking(False)
        return s

    def register(sl: _Slot, s: socket.socket) -> None:
        sl.sock = s
        by_fd[s.fileno()] = sl
        ep.register(s.fileno(), select.EPOLLIN)

    def unregister(sl: _Slot) -> None:
        s = sl.sock
        if s is None:
            return
        by_fd.pop(s.fileno(), None)
        try:
            ep.unregister(s.fileno())
        except (OSError, ValueError):
            pass
        s.close()
        sl.sock = None

    def send(sl: _Slot) -> None:
        s = sl.sock
        assert s is not None
        if transport == "udp":
            s.send(sl.cookie + b" " + sl.data)
        else:
            s.sendall(sl.data + b"\n")  # small: fits the socket buffer at once
        sl.deadline = time.monotonic() + timeout

    def start(sl: _Slot) -> bool:
        nonlocal nxt
        if nxt >= n:
            return False
        sl.idx = nxt
        nxt += 1
        sl.data = commands[sl.idx].encode()
        sl.cookie = prefix + str(sl.idx).encode()
        sl.buf = b""
        sl.tries = 0
        if transport == "unix":
            register(sl, open_stream())
        sl.t0 = time.perf_counter_ns()
        send(sl)
        return True

    def finish(sl: _Slot, reply: bytes | None) -> None:
        nonlocal done
        if reply is None:
            res.timeouts += 1
        else:
            lats.append(time.perf_counter_ns() - sl.t0)
            text = reply.decode(errors="replace").strip()
            replies[sl.idx] = text
            if text.startswith("E"):
                res.errors += 1
        done += 1
        sl.idx = -1
        if transport == "unix":
            unregister(sl)

    try:
        for sl in slots:
            if transport == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.connect(target)
                s.setblocking(False)
                register(sl, s)
            elif transport == "tcp":
                register(sl, open_stream())
        t_start = time.perf_counter()
        for sl in slots:
            start(sl)
        while done < n:
            now = time.monotonic()
            wait = min((sl.deadline for sl in slots if sl.idx >= 0), default=now + timeout) - now
            events = ep.poll(max(0.0, wait), 64)
            for fd, _ev in events:
                sl = by_fd.get(fd)
                if sl is None or sl.idx < 0 or sl.sock is None:
                    continue
                try:
                    data = sl.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ECONNREFUSED and transport == "udp":
                        continue  # a resend will follow
                    data = b""
                if transport == "udp":
                    want = sl.cookie + b" "
                    if not data.startswith(want):
                        continue  # late reply to an earlier try, or stray
                    finish(sl, data[len(want) :])
                    start(sl)
                elif transport == "tcp":
                    if not data:
                        raise RuntimeError("the relay closed the tcp control connection")
                    sl.buf += data
                    if b"\n" in sl.buf:
                        line, _, rest = sl.buf.partition(b"\n")
                        sl.buf = rest
                        finish(sl, line)
                        start(sl)
                else:  # unix one-shot: the reply ends when the relay closes
                    if data:
                        sl.buf += data
                        continue
                    finish(sl, sl.buf)
                    start(sl)
            now = time.monotonic()
            for sl in slots:
                if sl.idx >= 0 and now >= sl.deadline:
                    if transport == "udp" and sl.tries < retries:
                        sl.tries += 1
                        res.resent += 1
                        send(sl)
                    else:
                        finish(sl, None)
                        if transport == "tcp":  # the stream is out of step now
                            unregister(sl)
                            register(sl, open_stream())
                        start(sl)
        res.elapsed = time.perf_counter() - t_start
    finally:
        for sl in slots:
            unregister(sl)
        ep.close()
    return res
