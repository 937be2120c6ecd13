"""Two pyrtpproxy nodes in one Kamailio rtpproxy_sock set, with weights, and --state.

* Calls are shared by weight: Kamailio picks a set's node by a hash of the
  Call-ID (the byte sum, & 0xff, modulo the enabled nodes' weight sum); every
  call must be on the node that rule names, and both nodes carry calls.
* One node is killed (kill -9): a new call whose Call-ID hashes to it makes
  Kamailio fail to reach it (on loopback the ICMP error ends the wait at
  once; elsewhere after rtpproxy_tout x rtpproxy_retr), disable it and retry
  on the other node; the next such call goes there directly.
* The killed node, started again with the same --state, carries its calls on:
  their media flows again through the same relay ports.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import compat_sip
import pytest
import trio
from compat_sip import UA, check_media, gather
from conftest import LOOPBACK, Stack, free_port, log_tail, relay_command, stop_process, udp_control

WEIGHTS = (2, 1)
SLOW = 20.0  # s: SIP timeouts while Kamailio waits for a dead node (5 x 1 s by default)


def kamailio_node(call_id: str, weights: list[int]) -> int | None:
    """The index of the node Kamailio's select_rtpp_node picks (None: all disabled)."""
    total = sum(weights)
    if total == 0:
        return None
    cut = (sum(call_id.encode()) & 0xFF) % total
    for i, w in enumerate(weights):
        if w == 0:
            continue
        if cut < w:
            return i
        cut -= w
    return None


class PatientUA(UA):
    """A UA that waits longer (Kamailio stalls while it gives up on a dead node)
    and can be told which Call-ID to use."""

    next_call_id: str | None = None

    async def expect_request(self, method: str, timeout: float = SLOW):
        return await super().expect_request(method, timeout)

    async def expect_final(self, cseq: int, method: str, timeout: float = SLOW, on_provisional=None):
        return await super().expect_final(cseq, method, timeout, on_provisional)

    async def send_invite(self, target, late_offer: bool = False):
        if self.next_call_id is None:
            return await super().send_invite(target, late_offer)
        self.call_id = self.next_call_id
        self.local_uri = self.contact
        self.remote_uri = target.contact
        self.cseq += 1
        self._invite = self._request("INVITE", target.contact, self.cseq, self.sdp(), route=[])
        await self._send(self._invite.to_bytes(), self.proxy)
        return self._invite


def call_id_for(node: int, weights: list[int]) -> str:
    while True:
        cid = f"{compat_sip.token(10)}@compat.test"
        if kamailio_node(cid, weights) == node:
            return cid


class Node:
    def __init__(self, tmp: Path, name: str, port_min: int) -> None:
        self.name = name
        self.ctl = (LOOPBACK, free_port())  # the one Kamailio uses
        self.extra = (LOOPBACK, free_port())  # the tests'
        self.log = tmp / f"relay-{name}.log"
        self.argv = relay_command() + [
            "-f", "-F", "-s", f"udp:{self.ctl[0]}:{self.ctl[1]}", "-s", f"udp:{self.extra[0]}:{self.extra[1]}",
            "-l", LOOPBACK, "-m", str(port_min), "-M", str(port_min + 399), "-p", str(tmp / f"{name}.pid"),
            "-d", os.environ.get("COMPAT_LOG_LEVEL", "INFO"),
            "--state", f"sqlite:{tmp / (name + '.db')}", "--state-node", name,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"udp:{self.ctl[0]}:{self.ctl[1]}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for addr in (self.extra, self.ctl):
            try:
                assert udp_control(addr, "V", 20) == "20040107"
            except TimeoutError:
                raise AssertionError(f"node {self.name} not ready:\n{log_tail(self.log)}") from None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def q(self, cid: str, ftag: str, ttag: str) -> str:
        return udp_control(self.extra, f"Q {cid} {ftag};1 {ttag};1")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def two_nodes(kamailio_install):
    if os.environ.get("COMPAT_RELAY"):
        pytest.skip("--state is pyrtpproxy's; rtpproxy has no such option")
    exe, mods = kamailio_install
    tmp = Path(tempfile.mkdtemp(prefix="pyrtpp-compat-2n-"))
    # Ports a restart must get back: away from the ephemeral range and from the
    # ranges other tests' relays use at the same time.
    base = 7000 + 400 * random.randrange(0, 5)
    nodes = [Node(tmp, "n1", base), Node(tmp, "n2", base + 400)]
    st = Stack("udp", tmp)
    ok = False
    try:
        for n in nodes:
            n.start()
        st.relay_url = " ".join(f"{n.url}={w}" for n, w in zip(nodes, WEIGHTS))
        st.start_kamailio(exe, mods)
        yield st, nodes
        ok = True
    finally:
        st.stop()
        for n in nodes:
            n.stop()
        if ok and not os.environ.get("COMPAT_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"\ncompat-tests: logs kept in {tmp}", file=sys.stderr)
            for n in nodes:
                print(f"--- {n.name}\n{log_tail(n.log)}", file=sys.stderr)
            print(f"--- kamailio\n{log_tail(st.kamailio_log)}", file=sys.stderr)


async def place_call(proxy, call_id: str | None = None) -> tuple[UA, UA]:
    a = await PatientUA.open("A", proxy)
    b = await PatientUA.open("B", proxy)
    a.next_call_id = call_id
    try:
        ringing = trio.Event()

        def provisional(r):
            if r.status == 180:
                ringing.set()

        await gather(a.invite(b, provisional), b.answer_invite(ringing_seen=ringing, timeout=SLOW))
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


async def where(nodes: list[Node], a: UA, b: UA) -> list[int]:
    out = []
    for i, n in enumerate(nodes):
        r = await trio.to_thread.run_sync(n.q, a.call_id, a.local_tag, b.local_tag)
        if not r.startswith("E"):
            out.append(i)
    return out


async def test_two_nodes_weights_failover_and_state(two_nodes):
    st, nodes = two_nodes
    weights = list(WEIGHTS)
    calls: list[tuple[UA, UA, int]] = []
    try:
        with trio.fail_after(120):
            # 1. shared by weight: each call on the node Kamailio's rule names
            while len(calls) < 12 and not (
                sum(1 for c in calls if c[2] == 0) >= 2 and sum(1 for c in calls if c[2] == 1) >= 1
            ):
                a, b = await place_call(st.sip_addr)
                want = kamailio_node(a.call_id, weights)
                got = await where(nodes, a, b)
                calls.append((a, b, want))
                assert got == [want], f"Call-ID {a.call_id}: on nodes {got}, Kamailio's rule says {want}"
                await check_media(a, b, count=10)
            on = [sum(1 for c in calls if c[2] == i) for i in (0, 1)]
            assert on[0] >= 2 and on[1] >= 1, on

            # 2. node 1 dies: a new call hashed to it goes to node 2 (after Kamailio's timeout)
            nodes[0].kill9()
            for _ in range(2):
                a, b = await place_call(st.sip_addr, call_id_for(0, weights))
                calls.append((a, b, 1))
                assert await where(nodes[1:], a, b) == [0], f"Call-ID {a.call_id} is not on node 2"
                await check_media(a, b, count=10)

            # 3. node 1 is back with its state: its calls flow again, same ports
            nodes[0].start()
            for a, b, n in calls:
                await check_media(a, b, count=10)
                if n == 0:
                    assert await where(nodes[:1], a, b) == [0]
    finally:
        for a, b, _ in calls:
            a.close()
            b.close()
