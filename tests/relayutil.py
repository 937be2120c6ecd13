"""Helpers for end-to-end tests: an in-process relay and loopback peers."""

from __future__ import annotations

import itertools
import socket
import struct

import trio

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.daemon.dispatcher import Iface, Settings

V4 = Iface(socket.AF_INET, "127.0.0.1")
V6 = Iface(socket.AF_INET6, "::1")


def settings(**kw) -> Settings:
    kw.setdefault("ifaces", (V4,))
    kw.setdefault("port_min", 40000)
    kw.setdefault("port_max", 44998)
    return Settings(**kw)


class Relay:
    """A Server bound to a UDP control socket on 127.0.0.1:0, and a client."""

    def __init__(self, server: Server, addr) -> None:
        self.server = server
        self.addr = addr
        self._cookies = itertools.count(1)
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def cmd(self, text: str, cookie: str | None = None) -> str:
        if self.sock.getsockname()[1] == 0:
            await self.sock.bind(("127.0.0.1", 0))
        cookie = cookie or f"c{next(self._cookies)}"
        await self.sock.sendto(f"{cookie} {text}".encode(), self.addr)
        with trio.fail_after(5):
            while True:
                data = await self.sock.recv(65535)
                c, _, reply = data.decode().partition(" ")
                if c == cookie:
                    return reply.rstrip("\n")

    @property
    def dispatcher(self):
        return self.server.dispatcher

    async def barrier(self) -> None:
        """Wait until the media engine has handled every packet sent so far.

        Twice: the engine runs its queued jobs before the packets of the same
        wake-up, so the first barrier can return while packets that were
        already in a socket's queue (loopback delivers at sendto) are still
        waiting in that batch; the second one runs after that batch.
        """
        await self.server.engine.barrier()
        await self.server.engine.barrier()


async def start_relay(nursery, clock=None, workers=0, **kw) -> Relay:
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    addr = b.sockname
    extra = {} if clock is None else {"clock": clock}
    if workers:
        extra["workers"] = workers
    server = Server(settings(**kw), [b], **extra)
    await nursery.start(server.run)
    return Relay(server, addr)


def rtp_packet(
    ssrc: int, seq: int, payload: bytes = b"\xd5" * 160, pt: int = 0, ts: int | None = None
) -> bytes:
    ts = seq * 160 if ts is None else ts
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


class Peer:
    """A UDP endpoint on loopback standing for a phone's RTP socket."""

    def __init__(self, family=socket.AF_INET, host="127.0.0.1") -> None:
        self.family = family
        self.host = host
        self.sock = trio.socket.socket(family, socket.SOCK_DGRAM)

    async def bind(self, port=0) -> Peer:
        await self.sock.bind((self.host, port))
        self.port = self.sock.getsockname()[1]
        return self

    async def send(self, data: bytes, port: int, host: str | None = None) -> None:
        await self.sock.sendto(data, (host or self.host, port))

    async def recv(self, timeout=3.0):
        with trio.fail_after(timeout):
            data, src = await self.sock.recvfrom(65535)
            return data, src

    async def expect_nothing(self, relay: Relay, timeout=0.3) -> None:
        await relay.barrier()
        with trio.move_on_after(timeout) as cs:
            data, src = await self.sock.recvfrom(65535)
        assert cs.cancelled_caught, f"unexpected packet from {src}"

    def close(self) -> None:
        self.sock.close()


def port_of(reply: str) -> int:
    return int(reply.split()[0])


async def assert_fds_back_after_cycles(relay, cycles: int) -> None:
    """U/L/D ``cycles`` calls; the process's fd count ends where it began."""
    import gc
    import os

    import psutil

    for i in range(3):  # warm up: sockets, worker threads
        await relay.cmd(f"U warm{i} 127.0.0.1 30000 f")
        await relay.cmd(f"D warm{i} f")
    await relay.barrier()
    gc.collect()  # sockets other tests left to the collector
    proc = psutil.Process(os.getpid())
    base = proc.num_fds()
    for i in range(cycles):
        await relay.cmd(f"U fd{i} 127.0.0.1 30000 f")
        await relay.cmd(f"L fd{i} 127.0.0.1 30002 f t")
        assert await relay.cmd(f"D fd{i} f t") == "0"
    await relay.barrier()
    assert proc.num_fds() == base
    assert relay.server.engine.nsockets == 0
