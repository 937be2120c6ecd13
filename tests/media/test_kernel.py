"""--kernel: nftables forwards latched calls (caller, relay and callee namespaces).

Every test builds its own namespaces (tests/netnsutil.py) and runs the relay
inside the relay namespace; nothing touches the host's network.  Proof that
the kernel forwards: the relay is stopped (SIGSTOP) and the media still
flows.  Skipped without root, unshare or libnftables.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netnsutil import (
    A6,
    A_ADDR,
    A_ADDR2,
    B6,
    B_ADDR,
    RA6,
    RA_ADDR,
    RB_ADDR,
    Topology,
    inside,
    unavailable,
)

REASON = unavailable()
if REASON is None and ctypes.util.find_library("nftables") is None:
    REASON = "libnftables is not installed (apt-get install libnftables1)"
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

DEADLINE = 20.0  # seconds: every wait below gives up (and fails) after this


def rtp(seq: int, ssrc: int = 0x1234, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, ssrc) + payload


def wait_for(pred, what: str, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class KernelRelay:
    """A topology and a ``--kernel`` relay in its relay namespace."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.tmp = tmp
        self.topo = Topology()
        self.ctl = tmp / "ctl.sock"
        self.proc: subprocess.Popen | None = None
        self.extra = extra
        from pyrtpproxy.media.kernel import Nft

        with inside(self.topo.r):
            self.nft = Nft()  # its netlink socket lives in the relay namespace

    def start(self, *extra: str) -> None:
        if self.ctl.exists():
            self.ctl.unlink()
        argv = [sys.executable, "-m", "pyrtpproxy", "-f", "-F", "-s", f"unix:{self.ctl}"]
        argv += ["-m", "40000", "-M", "40999", "-d", "DBUG", *self.extra, *extra]
        self.log = open(self.tmp / "relay.log", "ab")
        self.proc = self.topo.popen(self.topo.r, argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ctl.exists() or self.proc.poll() is not None, "the control socket")
        assert self.proc.poll() is None, self.logtext()

        def served() -> bool:  # start-up (the kernel path's set-up) is over
            assert self.proc.poll() is None, self.logtext()
            try:
                return self.cmd("V") == "20040107"
            except OSError:  # bound, not listening yet
                return False

        wait_for(served, "the relay to serve")

    def logtext(self) -> str:
        return (self.tmp / "relay.log").read_text(errors="replace")

    def cmd(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.ctl))
            s.sendall(text.encode() + b"\n")
            out = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                out += d
        return out.decode().strip()

    def table(self) -> dict | None:
        """Our nftables table as {"in4": [...], "src4": [...], "chains": [...]} (None: absent)."""
        try:
            out = self.nft.run("list table inet pyrtpproxy", as_json=True)
        except Exception:
            return None
        t: dict = {"in4": [], "src4": [], "chains": []}
        for item in json.loads(out)["nftables"]:
            if "map" in item:
                t[item["map"]["name"]] = item["map"].get("elem", [])
            elif "chain" in item:
                t["chains"].append(item["chain"]["name"])
        return t

    def nflows(self) -> int:
        t = self.table()
        return len(t["in4"]) if t else 0

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(DEADLINE)
        self.log.close()
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        self.nft.close()
        self.topo.close()


@pytest.fixture
def relay(tmp_path):
    r = KernelRelay(tmp_path, "--kernel")
    try:
        r.start()  # a start that fails still ends the relay process
        yield r
    finally:
        r.close()


class Call:
    """A call through ``relay``: the caller is NAT'd (source port 5002, SDP says 5000)."""

    def __init__(self, relay: KernelRelay, callid: str = "c1", a_port: int = 5002) -> None:
        self.relay = relay
        topo = relay.topo
        self.callid = callid
        self.pu = int(relay.cmd(f"U {callid} {A_ADDR} 5000 ft").split()[0])  # callee sends here
        self.pl = int(relay.cmd(f"L {callid} {B_ADDR} 6000 ft tt").split()[0])  # caller sends here
        self.a = topo.udp(topo.a, A_ADDR, a_port)
        self.b = topo.udp(topo.b, B_ADDR, 6000)
        self.seq_a = 100
        self.seq_b = 900

    def a_to_b(self, n: int = 1, sock: socket.socket | None = None) -> list[tuple[bytes, tuple]]:
        got = []
        for _ in range(n):
            self.seq_a += 1
            (sock or self.a).sendto(rtp(self.seq_a, 0xAAAA), (RA_ADDR, self.pl))
            got.append(self.b.recvfrom(2048))
        return got

    def b_to_a(self, n: int = 1, sock: socket.socket | None = None) -> list[tuple[bytes, tuple]]:
        got = []
        for _ in range(n):
            self.seq_b += 1
            self.b.sendto(rtp(self.seq_b, 0xBBBB), (RB_ADDR, self.pu))
            got.append((sock or self.a).recvfrom(2048))
        return got

    def latch(self) -> None:
        data, src = self.a_to_b()[0]
        assert src == (RB_ADDR, self.pu)
        data, src = self.b_to_a()[0]
        assert src == (RA_ADDR, self.pl)
        wait_for(lambda: self.relay.nflows() == 2, "the kernel to take the call")

    def query(self) -> dict[str, int]:
        reply = self.relay.cmd(f"Q {self.callid} ft tt nrelayed npkts_ina npkts_ino ttl")
        return dict(zip(("nrelayed", "ina", "ino", "ttl"), map(int, reply.split())))

    def close(self) -> None:
        self.a.close()
        self.b.close()


@contextlib.contextmanager
def stopped(proc: subprocess.Popen):
    """The relay process frozen: whatever still flows, the kernel forwards."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def test_kernel_forwards_nated_caller_while_relay_is_frozen(relay):
    call = Call(relay)
    call.latch()
    with stopped(relay.proc):
        got = call.a_to_b(20)
        assert all(src == (RB_ADDR, call.pu) for _, src in got)
        assert [struct.unpack("!H", d[2:4])[0] for d, _ in got] == list(range(102, 122))
        back = call.b_to_a(20)
        assert all(src == (RA_ADDR, call.pl) for _, src in back)  # to the NAT'd port 5002
    # Counters: the kernel's packets are booked (read every second).
    q = wait_for(lambda: (q := call.query())["nrelayed"] >= 42 and q, "kernel counters in Q")
    assert q["ina"] == 21 and q["ino"] == 21 and q["nrelayed"] == 42
    info = relay.cmd("I")
    assert "packets received: 42" in info, info
    call.close()


def test_metrics_show_the_kernel_path(tmp_path):
    r = KernelRelay(tmp_path, "--kernel", "--metrics", "tcp:127.0.0.1:9901")
    try:
        r.start()  # a start that fails still ends the relay process
        call = Call(r)
        call.latch()
        call.a_to_b(10)

        def scrape() -> str:
            with inside(r.topo.r), socket.create_connection(("127.0.0.1", 9901), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            return out.decode()

        text = wait_for(lambda: "rtpproxy_kernel_packets 10" in (t := scrape()) and t, "kernel metrics")
        assert "rtpproxy_kernel_flows 2" in text and "rtpproxy_kernel_sessions 1" in text
        call.close()
    finally:
        r.close()


def test_stranger_spraying_ports_gets_nothing(relay):
    call = Call(relay)
    call.latch()
    topo = relay.topo
    stranger = topo.udp(topo.a, A_ADDR2, 5002)  # same port, another address
    stranger2 = topo.udp(topo.b, B_ADDR, 6001)
    for port in range(40000, 40020):
        stranger.sendto(rtp(7, 0x666), (RA_ADDR, port))
        stranger2.sendto(rtp(7, 0x666), (RB_ADDR, port))
    # The parties get nothing of it; the next packets are their own.
    got = call.a_to_b(1)
    assert got[0][0][8:12] == b"\x00\x00\xaa\xaa"
    back = call.b_to_a(1)
    assert back[0][0][8:12] == b"\x00\x00\xbb\xbb"
    # ... and the strangers got nothing back (ICMP errors aside).
    for s in (stranger, stranger2):
        s.setblocking(False)
        while True:
            try:
                data = s.recv(2048)
            except ConnectionRefusedError:
                continue
            except BlockingIOError:
                break
            raise AssertionError(f"a stranger received {data!r}")
    # The kernel state still names only the latched parties.
    t = relay.table()
    keys = json.dumps(t["in4"])
    assert A_ADDR2 not in keys and "6001" not in keys
    stranger.close()
    stranger2.close()
    call.close()


def test_relatch_mid_call_moves_the_kernel_state(relay):
    call = Call(relay)
    call.latch()
    call.a_to_b(600)  # far beyond the re-latch window of the last seq userspace saw
    # (at 50 packets/s the counters, read every second, are never that far behind)
    wait_for(lambda: call.query()["nrelayed"] >= 600, "the kernel counters")
    # The caller's NAT rebinds: same SSRC, next sequence numbers, new port.
    new_a = relay.topo.udp(relay.topo.a, A_ADDR, 5004)
    got = call.a_to_b(1, sock=new_a)  # reaches the socket, re-latches, is relayed
    assert got[0][1] == (RB_ADDR, call.pu)

    def moved():
        t = relay.table()
        return t and "5004" in json.dumps(t["in4"]) and "5002" not in json.dumps(t["in4"])

    wait_for(moved, "the kernel state to follow the re-latch")
    with stopped(relay.proc):
        back = call.b_to_a(5, sock=new_a)
        assert all(src == (RA_ADDR, call.pl) for _, src in back)
        call.a_to_b(5, sock=new_a)
    # The old address is not forwarded any more (userspace drops it).
    call.b.settimeout(0.5)
    call.seq_a += 1
    call.a.sendto(rtp(call.seq_a + 5000, 0x5555), (RA_ADDR, call.pl))
    with pytest.raises(TimeoutError):
        call.b.recvfrom(2048)
    new_a.close()
    call.close()


def test_delete_and_exit_leave_no_state(relay):
    c1 = Call(relay, "c1")
    c1.latch()
    assert relay.cmd("D c1 ft tt") == "0"
    wait_for(lambda: relay.nflows() == 0, "D to remove the flows")
    t = relay.table()
    assert t["src4"] == [] and sorted(t["chains"]) == ["post", "pre"]
    c1.close()
    c2 = Call(relay, "c2", a_port=5010)
    c2.latch()
    assert relay.stop() == 0
    assert relay.table() is None  # the whole table is gone at exit
    out = relay.topo.sh(relay.topo.r, "ip -4 route")  # the relay touched nothing else
    assert "10.71.1.0/24" in out
    c2.close()


def test_media_keeps_call_alive_silence_times_it_out(tmp_path):
    r = KernelRelay(tmp_path, "--kernel", "-T", "3")
    try:
        r.start()  # a start that fails still ends the relay process
        call = Call(r)
        call.latch()
        end = time.monotonic() + 5  # longer than the TTL, media only through the kernel
        while time.monotonic() < end:
            call.a_to_b(1)
            call.b_to_a(1)
            time.sleep(0.1)
        assert call.query()["ttl"] > 0  # still there
        # silence: the session times out and its rules go
        wait_for(lambda: r.cmd("Q c1 ft tt").startswith("E"), "the session to time out", 15)
        wait_for(lambda: r.nflows() == 0, "the flows to go")
        call.close()
    finally:
        r.close()


def test_kill_9_then_restart_cleans_up(relay):
    call = Call(relay)
    call.latch()
    relay.stop(signal.SIGKILL)
    assert relay.nflows() == 2  # left behind by the killed relay
    relay.start()
    t = relay.table()
    assert t is not None and t["in4"] == [] and t["src4"] == [] and sorted(t["chains"]) == ["post", "pre"]
    call.close()


def test_record_moves_the_call_to_userspace_norecord_back(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    r = KernelRelay(tmp_path, "--kernel", "-r", str(rec))
    try:
        r.start()  # a start that fails still ends the relay process
        call = Call(r)
        call.latch()
        assert r.cmd("R c1 ft tt") == "0"
        assert r.nflows() == 0  # out of the kernel before R answered
        call.a_to_b(3)
        call.b_to_a(3)
        assert r.cmd("S c1 ft tt") == "0"
        assert r.nflows() == 0  # still recording: stays in userspace
        assert r.cmd("N c1 ft tt") == "0"  # recording stopped: back to the kernel
        wait_for(lambda: r.nflows() == 2, "the call to go back to the kernel")
        with stopped(r.proc):
            call.a_to_b(3)
            call.b_to_a(3)
        r.cmd("D c1 ft tt")
        assert r.stop() == 0
        assert any(rec.iterdir())
        call.close()
    finally:
        r.close()


def test_kernel_without_forwarding_exits_auto_falls_back(tmp_path):
    r = KernelRelay(tmp_path, "--kernel")
    try:
        r.topo.sysctl(r.topo.r, "net.ipv4.ip_forward", "0")
        argv = [
            sys.executable,
            "-m",
            "pyrtpproxy",
            "-f",
            "-F",
            "-s",
            f"unix:{tmp_path / 'x.sock'}",
            "--kernel",
        ]
        p = r.topo.popen(r.topo.r, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = p.communicate(timeout=DEADLINE)
        assert p.returncode == 1
        assert b"--kernel: net.ipv4.ip_forward is 0" in out, out
        r.extra = ("--kernel=auto",)
        r.start()
        assert "--kernel=auto: relaying in userspace: net.ipv4.ip_forward is 0" in r.logtext()
        call = Call(r)
        call.a_to_b(1)
        call.b_to_a(1)
        call.a_to_b(3)  # relayed in userspace
        assert r.table() is None
        call.close()
    finally:
        r.close()


def test_kernel_as_unprivileged_user_exits(tmp_path):
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("setpriv is not installed")
    # root without CAP_NET_ADMIN (not another uid: the tree may not be readable by one)
    argv = ["/usr/bin/setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    argv += [sys.executable, "-m", "pyrtpproxy", "-f", "-F", "-s", "udp:127.0.0.1:0", "--kernel"]
    topo = Topology()
    try:
        topo.sysctl(topo.r, "net.ipv4.ip_forward", "1")
        p = topo.popen(topo.r, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/")
        out, _ = p.communicate(timeout=DEADLINE)
        assert p.returncode == 1, out
        assert b"--kernel: can't set up nftables table inet pyrtpproxy" in out, out
    finally:
        topo.close()


def test_hup_drain_keeps_kernel_calls_until_deleted_then_cleans_up(relay):
    call = Call(relay)
    call.latch()
    relay.proc.send_signal(signal.SIGHUP)
    # a new Call-ID each time: one that got in before the drain would be found
    # again (and is deleted below, so that the drain can finish)
    early: list[str] = []

    def refused() -> bool:
        cid = f"c9-{len(early)}"
        if relay.cmd(f"U {cid} 10.71.1.2 7000 x").startswith("E"):
            return True
        early.append(cid)
        return False

    wait_for(refused, "the drain to refuse new calls")
    with stopped(relay.proc):
        call.a_to_b(5)  # the call still flows, in the kernel
    assert relay.nflows() == 2
    for cid in early:
        assert relay.cmd(f"D {cid} x") == "0"
    assert relay.cmd("D c1 ft tt") == "0"
    assert relay.proc.wait(DEADLINE) == 0  # drained: the relay exits
    relay.log.close()
    assert relay.table() is None
    call.close()


def test_asymmetric_call_stays_in_userspace(relay):
    pu = int(relay.cmd(f"UA c1 {A_ADDR} 5002 ft").split()[0])
    pl = int(relay.cmd(f"LA c1 {B_ADDR} 6000 ft tt").split()[0])
    topo = relay.topo
    a, b = topo.udp(topo.a, A_ADDR, 5002), topo.udp(topo.b, B_ADDR, 6000)
    for i in range(3):
        a.sendto(rtp(i, 0xAAAA), (RA_ADDR, pl))
        assert b.recvfrom(2048)[1] == (RB_ADDR, pu)
        b.sendto(rtp(i, 0xBBBB), (RB_ADDR, pu))
        assert a.recvfrom(2048)[1] == (RA_ADDR, pl)
    # A symmetric call latched after it: once that one is in the kernel, the
    # asymmetric one (touched first, on its latch) was decided too.
    a.close()
    b.close()
    call = Call(relay, "c2", a_port=5010)
    call.latch()
    assert str(pl) not in json.dumps(relay.table()["in4"])
    assert relay.nflows() == 2
    call.close()


def test_ipv6_call_forwarded_by_the_kernel(tmp_path):
    r = KernelRelay(tmp_path, "--kernel", "-l", RA_ADDR, "-6", f"v6@{RA6}")  # both sides reach RA6
    try:
        r.start()  # a start that fails still ends the relay process
        topo = r.topo
        pu = int(r.cmd(f"U6 c6 {A6} 5000 ft").split()[0])  # the callee sends here
        pl = int(r.cmd(f"L6 c6 {B6} 6000 ft tt").split()[0])  # the caller sends here
        a, b = topo.udp(topo.a, A6, 5002), topo.udp(topo.b, B6, 6000)  # the caller is NAT'd
        a.sendto(rtp(1, 0xAAAA), (RA6, pl))
        assert b.recvfrom(2048)[1][:2] == (RA6, pu)
        b.sendto(rtp(1, 0xBBBB), (RA6, pu))
        assert a.recvfrom(2048)[1][:2] == (RA6, pl)

        def in6() -> int:
            t = json.loads(r.nft.run("list map inet pyrtpproxy in6", as_json=True))["nftables"]
            return len(next(i["map"] for i in t if "map" in i).get("elem", []))

        wait_for(lambda: in6() == 2, "the kernel to take the IPv6 call")
        with stopped(r.proc):
            for i in range(2, 12):
                a.sendto(rtp(i, 0xAAAA), (RA6, pl))
                data, src = b.recvfrom(2048)
                assert src[:2] == (RA6, pu) and data == rtp(i, 0xAAAA)
                b.sendto(rtp(i, 0xBBBB), (RA6, pu))
                assert a.recvfrom(2048)[1][:2] == (RA6, pl)
        reply = r.cmd("Q c6 ft tt nrelayed")
        wait_for(lambda: int(r.cmd("Q c6 ft tt nrelayed")) == 22, f"kernel counters in Q ({reply})")
        assert r.cmd("D c6 ft tt") == "0"
        wait_for(lambda: in6() == 0, "D to remove the IPv6 flows")
        a.close()
        b.close()
    finally:
        r.close()


def test_prompt_moves_the_call_to_userspace_stop_brings_it_back(relay, tmp_path):
    call = Call(relay)
    call.latch()
    prompt = tmp_path / "moh"
    (tmp_path / "moh.0").write_bytes(bytes(range(160)) * 500)  # 10 s of PCMU frames
    assert relay.cmd(f"P-1 c1 {prompt} 0 ft tt") == "0"  # to the caller
    assert relay.nflows() == 0  # out of the kernel before P answered
    data, src = call.a.recvfrom(2048)
    assert src == (RA_ADDR, call.pl) and data[8:12] != b"\x00\x00\xbb\xbb"  # the prompt, not B
    assert relay.cmd("S c1 ft tt") == "0"
    wait_for(lambda: relay.nflows() == 2, "the call to go back to the kernel")
    with stopped(relay.proc):
        call.a_to_b(3)
        while (back := call.b_to_a(1)[0])[0][8:12] != b"\x00\x00\xbb\xbb":
            pass  # prompt packets still in flight
        assert back[1] == (RA_ADDR, call.pl)
    call.close()
