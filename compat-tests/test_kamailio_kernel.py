"""Kamailio drives pyrtpproxy ``--kernel``: the kernel relays the calls.

Loopback cannot show the kernel path (DNAT'd loopback traffic is delivered
locally, and the relay keeps such calls in userspace), so this stack lives
in network namespaces the test creates (tests/netnsutil.py): Kamailio and
the relay in the relay namespace (SIP and media on 10.71.1.1, the relay
bound there with ``-l``), user agent A in the caller namespace (10.71.1.2),
user agent B in the callee namespace (10.71.2.2), joined by veth pairs.
Both calls check media byte for byte and source (compat_sip.check_media),
then the relay is frozen (SIGSTOP) and media must still flow: only the
kernel can relay it.  BYE removes the call's rules; exit removes the table.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
from compat_sip import UA, check_media, gather, make_sdp, token
from conftest import KAMAILIO_CFG, START_TIMEOUT, find_kamailio, log_tail, stop_process

from tests.netnsutil import A_ADDR, B_ADDR, RA_ADDR, Topology, inside, unavailable

REASON = unavailable()
if REASON is None and ctypes.util.find_library("nftables") is None:
    REASON = "libnftables is not installed (apt-get install libnftables1)"
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


class NsUA(UA):
    """A user agent whose sockets live in a namespace, on a given address."""

    addr = "127.0.0.1"

    @classmethod
    async def open_in(cls, name: str, proxy: tuple[str, int], ns: int, addr: str) -> NsUA:
        with inside(ns):
            sip = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            rtp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sip.bind((addr, 0))
        await rtp.bind((addr, 0))
        ua = cls(name, proxy, sip, rtp)
        ua.addr = addr
        ua.contact = f"sip:{name.lower()}@{addr}:{ua.sip_port}"
        return ua

    def _via(self) -> str:
        return f"SIP/2.0/UDP {self.addr}:{self.sip_port};branch=z9hG4bK{token(8)};rport"

    def sdp(self) -> bytes:
        self.sdp_version += 1
        return make_sdp(self.rtp_port, self.sess_id, self.sdp_version, ip=self.addr)


class KernelStack:
    def __init__(self, tmp: Path, exe: str, mods: str) -> None:
        self.tmp = tmp
        self.topo = Topology()
        self.ctl = tmp / "rtpproxy.sock"
        self.tctl = tmp / "tests.sock"
        self.sip_addr = (RA_ADDR, 5060)
        self.port_min = 2 * random.randrange(10000, 15000)
        self.relay_log = tmp / "relay.log"
        self.kam_log = tmp / "kamailio.log"
        self.relay = self._spawn(
            [sys.executable, "-m", "pyrtpproxy", "-f", "-F", "--kernel", "-l", RA_ADDR]
            + ["-s", f"unix:{self.ctl}", "-s", f"unix:{self.tctl}", "-d", "INFO"]
            + ["-m", str(self.port_min), "-M", str(self.port_min + 999)],
            self.relay_log,
        )
        self._wait(self.relay, self.relay_log, lambda: self.control("V") == "20040107")
        self.kamailio = self._spawn(
            [exe, "-DD", "-E", "-f", str(KAMAILIO_CFG), "-L", mods, "-Y", str(tmp), "-w", str(tmp)]
            + ["-P", str(tmp / "kamailio.pid"), "-m", "32", "-M", "4", "-l", f"udp:{RA_ADDR}:5060"]
            + ["-A", f'RTPPROXY_SOCK="unix:{self.ctl}"'],
            self.kam_log,
        )
        self._wait(self.kamailio, self.kam_log, self._options_ping)
        from pyrtpproxy.media.kernel import Nft

        with inside(self.topo.r):
            self.nft = Nft()

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return self.topo.popen(
                self.topo.r,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
            )

    def _wait(self, proc: subprocess.Popen, log: Path, probe) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} during start-up:\n" + log_tail(log))
            try:
                if probe():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("not ready in time:\n" + log_tail(log))
            time.sleep(0.05)

    def _options_ping(self) -> bool:
        with inside(self.topo.r):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.bind((RA_ADDR, 0))
            port = s.getsockname()[1]
            msg = (
                f"OPTIONS sip:{RA_ADDR}:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {RA_ADDR}:{port};branch=z9hG4bKp{port}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@{RA_ADDR}>;tag=p\r\nTo: <sip:{RA_ADDR}>\r\n"
                f"Call-ID: ping{port}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(msg.encode(), self.sip_addr)
            s.settimeout(0.5)
            try:
                return s.recv(65535).startswith(b"SIP/2.0 200")
            except TimeoutError:
                return False

    def control(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.tctl))
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
        return out.decode().strip()

    def nflows(self) -> int | None:
        try:
            out = self.nft.run("list map inet pyrtpproxy in4", as_json=True)
        except Exception:
            return None
        for item in json.loads(out)["nftables"]:
            if "map" in item:
                return len(item["map"].get("elem", []))
        return 0

    def close(self) -> None:
        stop_process(self.kamailio, group=True)
        stop_process(self.relay)
        self.nft.close()
        self.topo.close()


@pytest.fixture
def kstack():
    exe, mods = find_kamailio()
    if not (exe and mods):
        pytest.skip("kamailio and its rtpproxy module are not installed")
    tmp = Path(tempfile.mkdtemp(prefix="pyrtpp-compat-kernel-"))
    st = KernelStack(tmp, exe, mods)
    ok = False
    try:
        yield st
        ok = True
    finally:
        st.close()
        if ok and not os.environ.get("COMPAT_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"\ncompat-tests: logs kept in {tmp}", file=sys.stderr)


async def wait_flows(st: KernelStack, n: int) -> None:
    with trio.fail_after(15):
        while await trio.to_thread.run_sync(st.nflows) != n:
            await trio.sleep(0.05)


async def test_kamailio_calls_relayed_by_the_kernel(kstack):
    st = kstack
    a = await NsUA.open_in("A", st.sip_addr, st.topo.a, A_ADDR)
    b = await NsUA.open_in("B", st.sip_addr, st.topo.b, B_ADDR)
    try:
        ringing = trio.Event()

        def provisional(r):
            if r.status == 180:
                ringing.set()

        await gather(a.invite(b, provisional), b.answer_invite(ringing_seen=ringing))
        assert a.remote_media[0] == RA_ADDR and b.remote_media[0] == RA_ADDR
        await check_media(a, b, 20)  # userspace latches both parties
        await wait_flows(st, 2)  # RTP both ways in the kernel
        q1 = st.control(f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1 nrelayed")
        st.relay.send_signal(signal.SIGSTOP)
        try:
            await check_media(a, b, 50)  # the relay is frozen: only the kernel relays
        finally:
            st.relay.send_signal(signal.SIGCONT)
        with trio.fail_after(10):  # the kernel's packets are counted
            while True:
                q2 = st.control(f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1 nrelayed")
                if int(q2) >= int(q1) + 100:
                    break
                await trio.sleep(0.1)
        # re-INVITE: same ports, media still relayed
        await gather(b.answer_reinvite(), a.reinvite())
        await check_media(a, b, 20)
        await gather(a.bye(), b.answer_bye())
        assert st.control(f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1") == "E50"
        await wait_flows(st, 0)  # BYE (D) took the rules away
    finally:
        a.close()
        b.close()
    stop_process(st.relay)
    assert st.nflows() is None  # the table is gone with the relay
