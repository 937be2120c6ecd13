"""Attacks on latching over real loopback sockets: what a stranger gets.

A stranger sprays RTP at a running call's relay ports.  It must receive
none of the call's media and must not move the call.
"""

from __future__ import annotations

import trio
from relayutil import Peer, port_of, rtp_packet, start_relay


async def _drain(peer: Peer, relay) -> int:
    """How many packets ``peer`` has received so far (non-blocking)."""
    await relay.barrier()
    n = 0
    while True:
        with trio.move_on_after(0.05) as cs:
            await peer.sock.recvfrom(65535)
        if cs.cancelled_caught:
            return n
        n += 1


async def _exchange(relay, a: Peer, b: Peer, p_for_a: int, p_for_b: int, seq: int) -> None:
    """One packet each way; both must arrive (the call is intact)."""
    pa = rtp_packet(0xA1A1, seq)
    await a.send(pa, p_for_a)
    data, _ = await b.recv()
    assert data == pa
    pb = rtp_packet(0xB2B2, seq)
    await b.send(pb, p_for_b)
    data, _ = await a.recv()
    assert data == pb


async def test_stranger_in_first_10s_gets_nothing(nursery):
    """Issue 11 item 0: a session's first U/L opens no re-latch window."""
    relay = await start_relay(nursery)
    a, b, evil = await Peer().bind(), await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U h0 127.0.0.1 {a.port} f"))
    p_for_a = port_of(await relay.cmd(f"L h0 127.0.0.1 {b.port} f t"))
    await _exchange(relay, a, b, p_for_a, p_for_b, 1)
    # both parties' RTCP sockets latch too
    a_rtcp = await Peer().bind()
    b_rtcp = await Peer().bind()
    sr = b"\x80\xc8\x00\x06" + bytes(24)
    await b_rtcp.send(sr, p_for_b + 1)  # learned; relayed to a's SDP port + 1
    await a_rtcp.send(sr, p_for_a + 1)
    await b_rtcp.recv()
    await b_rtcp.send(sr, p_for_b + 1)
    await a_rtcp.recv()
    # seconds after the call started: spray both ports, another SSRC
    for i in range(20):
        await evil.send(rtp_packet(0xE0E0, 500 + i), p_for_a)
        await evil.send(rtp_packet(0xE0E0, 500 + i), p_for_b)
        await evil.send(rtp_packet(0xE0E0, 500 + i), p_for_a + 1)
        await evil.send(rtp_packet(0xE0E0, 500 + i), p_for_b + 1)
    for seq in range(2, 6):
        await _exchange(relay, a, b, p_for_a, p_for_b, seq)
    assert await _drain(evil, relay) == 0
    assert await _drain(a, relay) == 0 and await _drain(b, relay) == 0
    assert await _drain(a_rtcp, relay) == 0 and await _drain(b_rtcp, relay) == 0
    assert relay.server.engine.npkts_foreign >= 40
