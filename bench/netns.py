"""``--netns``: the relay in its own network namespace, joined to the load by a veth pair.

On loopback, the kernel's work for a packet (and all of it for a relay that
lets the kernel forward, ``--kernel``) is done on the *sender's* core.  Here
the generator and the harness live in namespace G (10.72.0.2), the relay in
namespace R (10.72.0.1), joined by one veth pair; R forwards (``ip_forward``,
no ICMP redirects), and receive packet steering sends the receive work of
R's end to the relay's CPU and of G's end to the generator's CPU, so the
relay's core pays for everything the relay does: socket I/O in userspace,
or the forwarding in the kernel.  Each namespace is held by an
``unshare -n -m sleep`` process (the mount namespace holds a private sysfs
for the RPS masks); the harness moves itself into G (setns) before it
starts anything, and runs the relay through ``nsenter`` into R.  Nothing
else on the host is touched; killing the two holders (by pid) removes it
all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000
GEN_IP = "10.72.0.2"
RELAY_IP = "10.72.0.1"


class BenchNet:
    def __init__(self, relay_cpu: int | None, gen_cpu: int | None) -> None:
        self.holders: list[subprocess.Popen] = []
        try:
            self.g = self._ns()
            self.r = self._ns()
            subprocess.run(
                ["ip", "link", "add", "vg", "netns", str(self.g), "type", "veth"]
                + ["peer", "name", "vr", "netns", str(self.r)],
                check=True,
                timeout=10,
            )
            self.sh(self.g, f"ip addr add {GEN_IP}/24 dev vg", "ip link set vg up", "ip link set lo up")
            self.sh(self.r, f"ip addr add {RELAY_IP}/24 dev vr", "ip link set vr up", "ip link set lo up")
            self.sh(
                self.r,
                "sysctl -qw net.ipv4.ip_forward=1",
                "sysctl -qw net.ipv4.conf.all.send_redirects=0",
                "sysctl -qw net.ipv4.conf.vr.send_redirects=0",
            )
            for ns, dev, cpu in ((self.r, "vr", relay_cpu), (self.g, "vg", gen_cpu)):
                if cpu is not None:
                    self.sh(
                        ns, f"sh -c 'echo {1 << cpu:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus'", mnt=True
                    )
        except BaseException:
            self.close()
            raise

    def _ns(self) -> int:
        script = "mount -t sysfs sysfs /sys && exec sleep 86400"
        p = subprocess.Popen(["unshare", "-n", "-m", "sh", "-c", script], stdin=subprocess.DEVNULL)
        self.holders.append(p)
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(2000):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{p.pid}/ns/net") != mine and _mounted_sysfs(p.pid):
                    return p.pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(0.005)
            if p.poll() is not None:
                break
        raise RuntimeError("could not create a network namespace (unshare -n -m, as root)")

    @staticmethod
    def sh(pid: int, *cmds: str, mnt: bool = False) -> None:
        for cmd in cmds:
            argv = ["nsenter", "-t", str(pid), "-n"] + (["-m"] if mnt else []) + ["sh", "-c", cmd]
            subprocess.run(argv, check=True, timeout=10, capture_output=True)

    def relay_prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.r), "-n", "--"]

    def enter_gen(self) -> None:
        """Move this process (its main thread, before any other) into G."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{self.g}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def close(self) -> None:
        for p in self.holders:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.holders.clear()


def _mounted_sysfs(pid: int) -> bool:
    """The holder mounted its sysfs and became ``sleep``."""
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip() == "sleep"


def core_busy_seconds(cpu: int) -> float:
    """Busy time of one CPU (user, nice, system, irq, softirq, steal) from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith(f"cpu{cpu} "):
                f = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal
                return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / hz
    raise ValueError(f"cpu{cpu} not in /proc/stat")
