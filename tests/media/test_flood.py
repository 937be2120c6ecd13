"""A flood of every port in -m..-M while 200 calls run.

An attacker on loopback sprays RTP-looking packets with random SSRCs and
junk at every port of the relay's range (RTP and RTCP) from one thread, as
fast as it can, while 200 latched calls carry media both ways and a
controller keeps asking G.  The relay must:

* keep answering the control socket (each reply well within the generous
  bound of relayutil's command timeout, and the flood really was running
  while it answered);
* relay the calls' media to the right party only: every packet a phone
  receives is one its counterpart sent, the attacker receives nothing;
* keep every call: once the flood stops, every call relays both ways with
  no loss (no stream was re-latched to the attacker).

Loss during the flood is measured and printed, not asserted beyond "media
got through" (it depends on the machine's load).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
import trio
from relayutil import Peer, port_of, start_relay

PORT_MIN, PORT_MAX = (
    21000,
    21998,
)  # 500 pairs: 400 used by the 200 calls, 100 unbound (below the ephemeral ports)
NCALLS = 200


def pkt(call: int, direction: int, seq: int) -> bytes:
    ssrc = 0x10000 + call * 2 + direction
    return (
        struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + struct.pack("!HBH", call, direction, seq) * 32
    )


class Flood(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.stop = threading.Event()
        self.sent = 0
        self.sweeps = 0
        self.junk: list[bytes] = []

    def run(self) -> None:
        rng = random.Random(7)
        junk = self.junk = [rng.randbytes(n) for n in (1, 12, 40, 172, 1400)]
        while not self.stop.is_set():
            for port in range(PORT_MIN, PORT_MAX + 2):
                if self.sent % 3:
                    data = (
                        struct.pack("!BBHII", 0x80, 0, rng.getrandbits(16), 0, rng.getrandbits(32)) + junk[2]
                    )
                else:
                    data = junk[self.sent % len(junk)]
                try:
                    self.sock.sendto(data, ("127.0.0.1", port))
                    self.sent += 1
                except (BlockingIOError, ConnectionRefusedError):
                    pass  # ICMP port unreachable from an unbound port: go on
            self.sweeps += 1

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65535))
            except BlockingIOError:
                return out
            except ConnectionRefusedError:
                continue


async def media_round(calls, seq: int, deadline: float) -> tuple[int, int]:
    """Each call sends one packet each way; returns (sent, received right)."""
    for i, (a, b, pa, pb) in enumerate(calls):
        await a.send(pkt(i, 0, seq), pa)
        await b.send(pkt(i, 1, seq), pb)
    got = 0
    for i, (a, b, _pa, _pb) in enumerate(calls):
        for peer, want in ((b, pkt(i, 0, seq)), (a, pkt(i, 1, seq))):
            with trio.move_on_at(deadline):
                while True:
                    data = await peer.sock.recv(2048)
                    # nothing but the counterpart's media, ever
                    assert data[:12] == want[:12] or data[8:12] == want[8:12], data[:20]
                    if data == want:
                        got += 1
                        break
    return 2 * len(calls), got


async def phone() -> tuple[Peer, Peer]:
    """A phone's RTP socket on an even port and its RTCP socket on the next
    one (where the relay sends RTCP it guesses the phone's address for)."""
    for _ in range(200):
        port = random.randrange(22000, 23998, 2)
        rtp, rtcp = Peer(), Peer()
        try:
            await rtp.bind(port)
            await rtcp.bind(port + 1)
            return rtp, rtcp
        except OSError:
            rtp.close()
            rtcp.close()
    raise AssertionError("no free port pair for a phone")


@pytest.mark.parametrize(
    "learning, strict", [("immediate", False), ("heuristic", True)], ids=["immediate", "heuristic-strict"]
)
async def test_flood_every_port_while_200_calls_run(nursery, learning, strict):
    with trio.fail_after(240):
        relay = await start_relay(
            nursery, port_min=PORT_MIN, port_max=PORT_MAX, endpoint_learning=learning, strict_source=strict
        )
        calls, rtcp_socks = [], []
        for i in range(NCALLS):
            (a, ac), (b, bc) = await phone(), await phone()
            rtcp_socks += [ac, bc]
            pb = port_of(await relay.cmd(f"U flood{i} 127.0.0.1 {a.port} f;1"))
            pa = port_of(await relay.cmd(f"L flood{i} 127.0.0.1 {b.port} f;1 t;1"))
            calls.append((a, b, pa, pb))
        seq = 0
        sent, got = await media_round(calls, seq, trio.current_time() + 10)
        assert got == sent  # every call latched both ways before the flood

        flood = Flood()
        flood.start()
        lat = []
        fsent, fgot = 0, 0
        try:
            while flood.sweeps < 3:  # the flood is up to speed
                await trio.sleep(0.01)
            for seq in range(1, 11):
                t0 = time.monotonic()
                before = flood.sent
                assert (await relay.cmd("G ncmds_rcvd")).isdigit()
                lat.append(time.monotonic() - t0)
                s, g = await media_round(calls, seq, trio.current_time() + 2)
                fsent, fgot = fsent + s, fgot + g
                assert flood.sent > before  # the flood ran while we were served
        finally:
            flood.stop.set()
            flood.join(10)
        loss = 100.0 * (fsent - fgot) / fsent
        assert fgot > fsent // 2  # media kept flowing during the flood
        await relay.barrier()
        # The attacker never receives a call's media.  (It may get its own
        # junk back: an RTCP stream that has seen no RTCP yet learns the
        # first source, rtpproxy's rule, so two such streams of one call can
        # both learn the attacker and reflect its packets to it.)
        back = flood.received()
        assert not [d for d in back if d[8:12] >= b"\x00\x01\x00\x00" and d[8:12] < b"\x00\x02\x00\x00"]
        assert all(d in flood.junk or d[12:] == flood.junk[2] for d in back)
        print(
            f"flood ({learning}{' strict' if strict else ''}): {flood.sent} packets in {flood.sweeps} sweeps of {PORT_MAX - PORT_MIN + 2} ports; "
            f"control latency max {max(lat) * 1000:.1f} ms; call media loss during the flood {loss:.2f} %; "
            f"the attacker's own packets reflected to it {len(back)}"
        )
        for seq in range(11, 14):  # every call still carries media both ways, nothing lost
            sent, got = await media_round(calls, seq, trio.current_time() + 10)
            assert got == sent
        assert await relay.cmd("V") == "20040107"
        foreign = relay.server.engine.npkts_foreign
        assert foreign > 0  # the flood did reach the latched streams and was dropped there
        flood.sock.close()
        for a, b, _, _ in calls:
            a.close()
            b.close()
        for x in rtcp_socks:  # the flood's junk may reach them: unlatched RTCP (rtpproxy's rule)
            x.close()
