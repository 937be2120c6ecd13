"""A UDP control-protocol client that talks to a relay the way Kamailio does.

Requests are ``COOKIE COMMAND`` datagrams without a newline, the cookie is
``<pid>_<seq>``, a request that gets no answer is resent with the same
cookie, and replies whose cookie does not match are dropped.  Several
clients (threads, each with its own socket, like Kamailio's worker
processes) can run a phase of commands in parallel; each command's latency
is measured from its first send to its reply.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field

_ids = itertools.count()


class ControlClient:
    def __init__(self, addr: tuple[str, int], *, timeout: float = 1.0, retries: int = 4) -> None:
        self.addr = addr
        self.timeout = timeout
        self.retries = retries
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(addr)
        self.sock.settimeout(timeout)
        self.prefix = f"{os.getpid()}{next(_ids):03d}_"
        self.seq = 0
        self.resent = 0

    def close(self) -> None:
        self.sock.close()

    def cmd(self, command: str) -> str:
        """Send ``command``; return the reply without cookie and newline."""
        cookie = f"{self.prefix}{self.seq}"
        self.seq += 1
        data = f"{cookie} {command}".encode()
        want = cookie.encode() + b" "
        for attempt in range(self.retries + 1):
            if attempt:
                self.resent += 1
            try:
                self.sock.send(data)
            except ConnectionRefusedError:
                time.sleep(self.timeout / 4)
                continue
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    reply = self.sock.recv(65536)
                except TimeoutError:
                    break
                except ConnectionRefusedError:
                    time.sleep(min(left, self.timeout / 4))
                    break
                if reply.startswith(want):
                    return reply[len(want) :].decode(errors="replace").strip()
        raise TimeoutError(f"no reply to {command!r}")


@dataclass
class Phase:
    """Results of running a list of commands with ``clients`` parallel clients."""

    name: str
    clients: int
    replies: list[str | None]
    latencies: list[float]  # seconds, of the commands that got a reply
    elapsed: float
    errors: int = 0  # replies starting with "E"
    timeouts: int = 0
    resent: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.replies) / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "cmds": len(self.replies),
            "clients": self.clients,
            "elapsed_s": round(self.elapsed, 4),
            "rate_per_s": round(self.rate, 1),
            "lat_p50_ms": round(percentile(lat, 50) * 1e3, 3),
            "lat_p99_ms": round(percentile(lat, 99) * 1e3, 3),
            "lat_max_ms": round(lat[-1] * 1e3, 3) if lat else None,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "resent": self.resent,
        }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def run_phase(name: str, addr: tuple[str, int], commands: list[str], clients: int) -> Phase:
    """Run ``commands`` (in order within each client) over ``clients`` sockets."""
    clients = max(1, min(clients, len(commands) or 1))
    replies: list[str | None] = [None] * len(commands)
    lats: list[list[float]] = [[] for _ in range(clients)]
    counts = [[0, 0, 0] for _ in range(clients)]  # errors, timeouts, resent
    conns = [ControlClient(addr) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(k: int) -> None:
        c = conns[k]
        mine = lats[k]
        barrier.wait()
        for i in range(k, len(commands), clients):
            t = time.perf_counter()
            try:
                r = c.cmd(commands[i])
            except TimeoutError:
                counts[k][1] += 1
                continue
            mine.append(time.perf_counter() - t)
            replies[i] = r
            if r.startswith("E"):
                counts[k][0] += 1
        counts[k][2] = c.resent

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    return Phase(
        name=name,
        clients=clients,
        replies=replies,
        latencies=[x for sub in lats for x in sub],
        elapsed=elapsed,
        errors=sum(c[0] for c in counts),
        timeouts=sum(c[1] for c in counts),
        resent=sum(c[2] for c in counts),
    )


def reply_port(reply: str | None) -> int | None:
    """The media port of a U/L reply (``PORT [IP [AF]]``), or None."""
    if not reply or reply.startswith("E"):
        return None
    try:
        port = int(reply.split()[0])
    except (ValueError, IndexError):
        return None
    return port if 0 < port < 65536 else None


@dataclass(frozen=True)
class CallIds:
    """Call-ID and tags of session ``i`` of run ``run``."""

    run: str

    def cid(self, i: int) -> str:
        return f"bench-{self.run}-{i}@127.0.0.1"

    def atag(self, i: int) -> str:
        return f"a{i}x{self.run}"

    def btag(self, i: int) -> str:
        return f"b{i}x{self.run}"


def offer_commands(ids: CallIds, a_ports: list[int], ip: str = "127.0.0.1") -> list[str]:
    """Kamailio's rtpproxy_offer for an INVITE (``;1`` media number, codecs)."""
    return [f"Uc0,8,101 {ids.cid(i)} {ip} {p} {ids.atag(i)};1" for i, p in enumerate(a_ports)]


def answer_commands(ids: CallIds, b_ports: list[int], ip: str = "127.0.0.1") -> list[str]:
    """Kamailio's rtpproxy_answer for the 200 OK."""
    return [f"Lc0,8,101 {ids.cid(i)} {ip} {p} {ids.atag(i)};1 {ids.btag(i)};1" for i, p in enumerate(b_ports)]


def delete_commands(ids: CallIds, n: int) -> list[str]:
    """Kamailio's unforce_rtp_proxy for a BYE from A (no ``;1``)."""
    return [f"D {ids.cid(i)} {ids.atag(i)} {ids.btag(i)}" for i in range(n)]
