"""End to end over loopback: Z re-packetisation, the RTP analyser's Q/G
counters, U ... && C forking, and the VF answers that claim them."""

from __future__ import annotations

import struct

import trio
from relayutil import Peer, port_of, rtp_packet, start_relay

from pyrtpproxy.protocol import caps

QNAMES = "rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs"


def hdr(pkt: bytes) -> tuple[int, int, int, int]:
    """(payload length, pt, seq, ts) of an RTP packet."""
    _b0, pt, seq, ts, _ssrc = struct.unpack("!BBHII", pkt[:12])
    return len(pkt) - 12, pt & 0x7F, seq, ts


async def rtcp_pair() -> Peer:
    """A peer whose port + 1 is free too (for its RTCP)."""
    import socket

    for _ in range(50):
        p = await Peer().bind()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", p.port + 1))
            except OSError:
                p.close()
                continue
        return p
    raise AssertionError("no free port pair")


async def setup(relay, a: Peer, b: Peer, call="c", umods="", lmods=""):
    pb = port_of(await relay.cmd(f"U{umods} {call} 127.0.0.1 {a.port} fA"))
    pa = port_of(await relay.cmd(f"L{lmods} {call} 127.0.0.1 {b.port} fA tB"))
    return pa, pb  # a sends to pa, b sends to pb


async def test_vf_claims_every_rtpproxy_code(nursery):
    relay = await start_relay(nursery)
    for c in caps.CAPS:
        want = "0" if c.code == "20081224" else "1"  # 20081224 needs -n
        assert await relay.cmd(f"VF {c.code}") == want, c.code


async def test_z20_joins_10ms_packets(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    pa, _pb = await setup(relay, a, b, umods="Z20")
    for s in range(100, 110):
        await a.send(rtp_packet(0x77, s, bytes([s]) * 80, ts=s * 80), pa)
    got = []
    for _ in range(5):
        data, _ = await b.recv()
        got.append(data)
    await b.expect_nothing(relay)
    # 20 ms of PCMU per packet, renumbered from the first seq, first ts kept
    assert [hdr(p) for p in got] == [(160, 0, 100 + i, (100 + 2 * i) * 80) for i in range(5)]
    assert got[0][12:] == bytes([100]) * 80 + bytes([101]) * 80
    assert await relay.cmd("G npkts_resizer_in npkts_resizer_out npkts_resizer_discard") == "10 5 0"
    # the other direction is not resized
    back = rtp_packet(0x88, 5, b"\x01" * 80, ts=400)
    await b.send(back, _pb)
    assert (await a.recv())[0] == back


async def test_z10_splits_30ms_packets_and_g729(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    pa, _ = await setup(relay, a, b, umods="Z10")
    await a.send(rtp_packet(1, 7, bytes(range(240)), ts=1000), pa)
    got = [(await b.recv())[0] for _ in range(3)]
    assert [hdr(p) for p in got] == [(80, 0, 7, 1000), (80, 0, 8, 1080), (80, 0, 9, 1160)]
    assert b"".join(p[12:] for p in got) == bytes(range(240))
    # G.729 (10-byte frames) to 30 ms: three packets become one
    c, d = await Peer().bind(), await Peer().bind()
    pc, _ = await setup(relay, c, d, call="g729", umods="Z30")
    for s in range(3):
        await c.send(rtp_packet(2, 50 + s, bytes([s]) * 10, pt=18, ts=s * 80), pc)
    data, _ = await d.recv()
    assert hdr(data) == (30, 18, 50, 0)


async def test_z_late_packet_discarded_and_unknown_codec_passes(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    pa, _ = await setup(relay, a, b, umods="Z20")
    for s in (10, 11):
        await a.send(rtp_packet(3, s, b"\x00" * 80, ts=s * 80), pa)
    assert hdr((await b.recv())[0]) == (160, 0, 10, 800)
    await a.send(rtp_packet(3, 9, b"\x00" * 80, ts=9 * 80), pa)  # older than what was sent
    dtmf = rtp_packet(3, 12, b"\x01\x0a\x00\xa0", pt=101, ts=12 * 80)
    await a.send(dtmf, pa)
    assert (await b.recv())[0] == dtmf  # not a fixed-frame codec: as it is
    await b.expect_nothing(relay)
    assert await relay.cmd("G npkts_resizer_in npkts_resizer_out npkts_resizer_discard") == "3 1 1"


async def test_u_without_z_ends_resizing(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    pa, _ = await setup(relay, a, b, umods="Z20")
    await a.send(rtp_packet(4, 1, b"\x00" * 80, ts=80), pa)  # queued, waiting for more
    await relay.barrier()
    await relay.cmd(f"U c 127.0.0.1 {a.port} fA")  # no Z: the queue is dropped
    pkt = rtp_packet(4, 2, b"\x00" * 80, ts=160)
    await a.send(pkt, pa)
    assert (await b.recv())[0] == pkt
    assert await relay.cmd("G npkts_resizer_in npkts_resizer_discard") == "1 1"


async def send_all(relay, a: Peer, port: int, seqs, **kw) -> None:
    for s in seqs:
        await a.send(rtp_packet(kw.get("ssrc", 0x55), s, b"\xd5" * 160, ts=s * 160), port)
    await relay.barrier()
    await trio.sleep(0.05)  # the relay reads what the kernel holds
    await relay.barrier()


async def test_analysis_counters_with_analyze(nursery):
    relay = await start_relay(nursery, analyze=True)
    a, b = await Peer().bind(), await Peer().bind()
    pa, pb = await setup(relay, a, b)
    # loss (204, 207), a duplicate (203), reordering (206 before 205)
    await send_all(relay, a, pa, [200, 201, 202, 203, 203, 206, 205, 208, 209])
    await b.send(b"\x80\x00\x01", pb)  # too short for RTP: a parse error
    await relay.barrier()
    await trio.sleep(0.05)
    await relay.barrier()
    # values from rtpproxy 3.2 on the same packets (bench/rtpa_compare.py)
    assert await relay.cmd(f"Qv c fA tB {QNAMES}") == (
        "rtpa_nsent=10 rtpa_nrcvd=8 rtpa_ndups=1 rtpa_nlost=2 rtpa_perrs=0"
    )
    assert await relay.cmd(f"Q c tB fA {QNAMES}") == "0 0 0 0 1"
    ipi = await relay.cmd("Qv c fA tB longest_ipi rtpa_jlast rtpa_jmax rtpa_javg")
    assert [kv.split("=")[0] for kv in ipi.split()] == ["longest_ipi", "rtpa_jlast", "rtpa_jmax", "rtpa_javg"]
    assert all(float(kv.split("=")[1]) >= 0 for kv in ipi.split())
    # G sums a stream's analysis when its session ends
    assert await relay.cmd("G rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs") == "0 0 0 0 0"
    assert await relay.cmd("D c fA") == "0"
    assert await relay.cmd("G rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs") == "10 8 1 2 1"


async def test_analysis_starts_at_first_q_that_asks(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    pa, _ = await setup(relay, a, b)
    await send_all(relay, a, pa, range(10, 15))
    assert relay.dispatcher.table.find("c", "fA", "tB")[0].rtp[1].hook is None  # fast path
    assert await relay.cmd(f"Q c fA tB {QNAMES}") == "0 0 0 0 0"  # from now on
    await relay.barrier()
    await send_all(relay, a, pa, [15, 16, 18, 18])
    assert await relay.cmd(f"Q c fA tB {QNAMES}") == "4 3 1 1 0"
    assert await relay.cmd("Q c fA tB") == "60 9 0 9 0"


async def test_fork_copies_both_streams_and_drops_own(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()  # the call being forked
    m1, m2 = await Peer().bind(), await rtcp_pair()  # the monitoring session's parties
    pa, pb = await setup(relay, a, b, call="src")
    r = await relay.cmd(f"U mon 127.0.0.1 {m1.port} mA tM && C src fA tB")
    pm1 = port_of(r)
    assert r == f"{pm1} 127.0.0.1"  # a successful && C adds nothing to the reply
    pm2 = port_of(await relay.cmd(f"L mon 127.0.0.1 {m2.port} mA tM"))
    for i in range(3):
        x = rtp_packet(0x10, i, b"\x01" * 160)
        await a.send(x, pa)
        assert (await b.recv())[0] == x  # the call goes on
        # stream 0 of the named session (the to-tag party's, b) goes to this
        # U's party, stream 1 (a's) to the other, each out of the port that
        # faces it (rtpproxy's fwd[i][j] pairing)
        assert await m2.recv() == (x, ("127.0.0.1", pm1))
        y = rtp_packet(0x20, i, b"\x02" * 160)
        await b.send(y, pb)
        assert (await a.recv())[0] == y
        assert await m1.recv() == (y, ("127.0.0.1", pm2))
    # RTCP is forked too (it goes to the RTP port + 1)
    m2c = await Peer().bind(m2.port + 1)
    rtcp = b"\x81\xc8\x00\x06" + b"\x00" * 24
    await a.send(rtcp, pa + 1)
    assert await m2c.recv() == (rtcp, ("127.0.0.1", pm1 + 1))
    # the monitoring parties' own media goes nowhere (counted as dropped)
    await m1.send(rtp_packet(0x30, 1), pm2)
    await m2.send(rtp_packet(0x31, 1), pm1)
    await m1.expect_nothing(relay)
    await m2.expect_nothing(relay, timeout=0.05)
    assert await relay.cmd("Q mon mA tM") == "60 1 1 0 2"
    # the forked call's counters do not see the copies
    assert await relay.cmd("Q src fA tB") == "60 3 3 6 0"
    # deleting the monitor ends the fork; the call is untouched
    assert await relay.cmd("D mon mA tM") == "0"
    x = rtp_packet(0x10, 9, b"\x01" * 160)
    await a.send(x, pa)
    assert (await b.recv())[0] == x
    await m2.expect_nothing(relay)


async def test_fork_twice_copies_twice(nursery):
    relay = await start_relay(nursery)
    a, b, m1 = await Peer().bind(), await Peer().bind(), await Peer().bind()
    _, pb = await setup(relay, a, b, call="src")
    for _ in range(2):  # rtpproxy registers a second fork on the same streams
        await relay.cmd(f"U mon 127.0.0.1 {m1.port} mA tM && C src fA tB")
    await relay.cmd("L mon 127.0.0.1 9 mA tM")
    x = rtp_packet(0x10, 1, b"\x01" * 160)
    await b.send(x, pb)
    assert [(await m1.recv())[0] for _ in range(2)] == [x, x]
    await m1.expect_nothing(relay)


async def test_fork_errors(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await setup(relay, a, b, call="src")
    r = await relay.cmd(f"U mon 127.0.0.1 {a.port} mA tM && C nosuch f t")
    assert r.endswith(" && -1")
    # forking a session into itself
    r = await relay.cmd(f"U src 127.0.0.1 {a.port} fA tB && C src fA tB")
    assert r.endswith(" && -1")
    assert await relay.cmd(f"U mon 127.0.0.1 {a.port} mA && C src fA tB") == "E3"


async def test_slow_path_sessions_leave_the_workers(nursery):
    relay = await start_relay(nursery, workers=1)
    a, b = await Peer().bind(), await Peer().bind()
    # an ordinary session is relayed by the worker
    pa, _ = await setup(relay, a, b, call="w")
    assert relay.dispatcher.table.find("w", "fA", "tB")[0].shard == 0
    await send_all(relay, a, pa, range(1, 4))
    for _ in range(3):
        await b.recv()
    # asking for analysis brings it into this process, counting from then on
    assert await relay.cmd(f"Q w fA tB {QNAMES}") == "0 0 0 0 0"
    assert relay.dispatcher.table.find("w", "fA", "tB")[0].shard is None
    await send_all(relay, a, pa, [4, 5, 7])
    for _ in range(3):
        await b.recv()
    assert await relay.cmd(f"Q w fA tB {QNAMES}") == "4 3 0 1 0"
    # a session created with Z never goes to a worker
    c, d = await Peer().bind(), await Peer().bind()
    pc, _ = await setup(relay, c, d, call="z", umods="Z20")
    assert relay.dispatcher.table.find("z", "fA", "tB")[0].shard is None
    for s in (1, 2):
        await c.send(rtp_packet(9, s, b"\x00" * 80, ts=s * 80), pc)
    assert hdr((await d.recv())[0])[0] == 160
    # a worker's session given Z later comes back first
    e, f = await Peer().bind(), await Peer().bind()
    pe, _ = await setup(relay, e, f, call="w2")
    assert relay.dispatcher.table.find("w2", "fA", "tB")[0].shard == 0
    await relay.cmd(f"UZ20 w2 127.0.0.1 {e.port} fA tB")
    assert relay.dispatcher.table.find("w2", "fA", "tB")[0].shard is None
    for s in (1, 2):
        await e.send(rtp_packet(8, s, b"\x00" * 80, ts=s * 80), pe)
    assert hdr((await f.recv())[0])[0] == 160
