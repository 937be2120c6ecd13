"""Network namespaces for the kernel-path tests and benchmarks (root only).

Topology: three namespaces, caller (A), relay (R) and callee (B), each held
alive by an ``unshare -n sleep`` process the helper starts and kills by pid;
veth pairs join A-R (10.71.1.0/24) and R-B (10.71.2.0/24), R forwards.
Traffic between A and B crosses R's forwarding path, as it would on a real
relay host (on loopback DNAT'd traffic would be delivered locally).
Sockets are opened inside a namespace by switching the calling thread into
it (setns) just for the socket() call; the socket stays there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

A_ADDR, A_ADDR2, RA_ADDR = "10.71.1.2", "10.71.1.3", "10.71.1.1"
B_ADDR, RB_ADDR = "10.71.2.2", "10.71.2.1"
A6, RA6, B6, RB6 = "fd71:1::2", "fd71:1::1", "fd71:2::2", "fd71:2::1"


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        subprocess.run(["unshare", "-n", "true"], check=True, timeout=10, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return "unshare -n does not work here"
    return None


@contextlib.contextmanager
def inside(pid: int):
    """Run the block in ``pid``'s network namespace (this thread only)."""
    me = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(me, CLONE_NEWNET) != 0:  # pragma: no cover
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(me)
        os.close(target)


class Topology:
    """Caller, relay and callee namespaces joined by veth pairs."""

    def __init__(self) -> None:
        self.holders: list[subprocess.Popen] = []
        try:
            self.a = self._ns()
            self.r = self._ns()
            self.b = self._ns()
            self._link(self.a, "va", A_ADDR, self.r, "vra", RA_ADDR)
            self._link(self.b, "vb", B_ADDR, self.r, "vrb", RB_ADDR)
            self.sh(self.a, f"ip addr add {A_ADDR2}/24 dev va")
            self.sh(self.a, f"ip route add default via {RA_ADDR}")
            self.sh(self.b, f"ip route add default via {RB_ADDR}")
            for ns, dev, addr in (
                (self.a, "va", A6),
                (self.r, "vra", RA6),
                (self.b, "vb", B6),
                (self.r, "vrb", RB6),
            ):
                self.sh(ns, f"ip -6 addr add {addr}/64 dev {dev} nodad")
            self.sh(self.a, f"ip -6 route add default via {RA6}")
            self.sh(self.b, f"ip -6 route add default via {RB6}")
            self.sysctl(self.r, "net.ipv6.conf.all.forwarding", "1")
            self.sysctl(self.r, "net.ipv4.ip_forward", "1")
            self.sysctl(self.r, "net.ipv4.conf.all.send_redirects", "0")
        except BaseException:
            self.close()
            raise

    def _ns(self) -> int:
        p = subprocess.Popen(["unshare", "-n", "sleep", "3600"], stdin=subprocess.DEVNULL)
        self.holders.append(p)
        # wait until the holder is in its own namespace
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(2000):
            try:
                if os.readlink(f"/proc/{p.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(0.005)
        self.sh(p.pid, "ip link set lo up")
        return p.pid

    def _link(self, ns1: int, n1: str, a1: str, ns2: int, n2: str, a2: str) -> None:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                n1,
                "netns",
                str(ns1),
                "type",
                "veth",
                "peer",
                "name",
                n2,
                "netns",
                str(ns2),
            ],
            check=True,
            timeout=10,
        )
        for ns, n, a in ((ns1, n1, a1), (ns2, n2, a2)):
            self.sh(ns, f"ip addr add {a}/24 dev {n}")
            self.sh(ns, f"ip link set {n} up")
            # full checksums on the wire: a wrong rewrite would be dropped
            if shutil.which("ethtool"):
                subprocess.run(
                    ["nsenter", "-t", str(ns), "-n", "ethtool", "-K", n, "tx", "off"],
                    capture_output=True,
                    timeout=10,
                )

    @staticmethod
    def sh(ns: int, cmd: str) -> str:
        r = subprocess.run(
            ["nsenter", "-t", str(ns), "-n", *cmd.split()],
            check=True,
            timeout=10,
            capture_output=True,
            text=True,
        )
        return r.stdout

    @staticmethod
    def sysctl(ns: int, key: str, val: str) -> None:
        with inside(ns), open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(val)

    def udp(self, ns: int, addr: str, port: int = 0) -> socket.socket:
        with inside(ns):
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
        s.settimeout(5.0)
        return s

    def popen(self, ns: int, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", "-t", str(ns), "-n", "--", *argv], **kw)

    def close(self) -> None:
        for p in self.holders:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.holders.clear()
