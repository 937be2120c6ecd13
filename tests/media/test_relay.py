"""End to end: control over loopback UDP, media over loopback UDP."""

from __future__ import annotations

import socket

import trio
from relayutil import V4, V6, Peer, assert_fds_back_after_cycles, port_of, rtp_packet, start_relay

from pyrtpproxy.daemon.dispatcher import Iface


async def call_setup(relay, a: Peer, b: Peer, call="call1", ftag="fA;1", ttag="tB;1", umods="", lmods=""):
    ru = await relay.cmd(f"U{umods} {call} 127.0.0.1 {a.port} {ftag}")
    rl = await relay.cmd(f"L{lmods} {call} 127.0.0.1 {b.port} {ftag} {ttag}")
    return port_of(ru), port_of(rl)


async def test_call_relays_both_ways_symmetric(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    ru = await relay.cmd(f"U call1 127.0.0.1 {a.port} fA;1")
    p_for_b, addr = ru.split()
    assert addr == "127.0.0.1" and 40000 <= int(p_for_b) <= 44998 and int(p_for_b) % 2 == 0
    rl = await relay.cmd(f"L call1 127.0.0.1 {b.port} fA;1 tB;1")
    p_for_a = port_of(rl)
    assert rl == f"{p_for_a} 127.0.0.1"
    # repeated U/L give the same ports (183 then 200 OK, re-INVITE)
    assert await relay.cmd(f"U call1 127.0.0.1 {a.port} fA;1") == ru
    assert await relay.cmd(f"L call1 127.0.0.1 {b.port} fA;1 tB;1") == rl
    for seq in range(20):
        pkt = rtp_packet(0xA1, seq, bytes([seq]) * 160)
        await a.send(pkt, p_for_a)
        data, src = await b.recv()
        assert data == pkt and src == ("127.0.0.1", int(p_for_b))
        back = rtp_packet(0xB2, 1000 + seq, bytes([255 - seq]) * 160)
        await b.send(back, int(p_for_b))
        data, src = await a.recv()
        assert data == back and src == ("127.0.0.1", p_for_a)
    assert await relay.cmd("Q call1 fA;1 tB;1") == "60 20 20 40 0"
    assert await relay.cmd("Qv call1 tB;1 fA;1") == "ttl=60 npkts_ina=20 npkts_ino=20 nrelayed=40 ndropped=0"
    # the callee's re-INVITE (U from=tB to=fA) keeps the ports
    assert port_of(await relay.cmd(f"U call1 127.0.0.1 {b.port} tB;1 fA;1")) == p_for_a
    assert port_of(await relay.cmd(f"L call1 127.0.0.1 {a.port} tB;1 fA;1")) == int(p_for_b)
    assert await relay.cmd("D call1 tB fA") == "0"
    assert await relay.cmd("Q call1 fA;1 tB;1") == "E50"
    assert await relay.cmd("D call1 tB fA") == "E50"


async def test_packets_before_lookup_are_dropped(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U c2 127.0.0.1 {a.port} f"))
    await b.send(rtp_packet(7, 1), p_for_b)  # callee early: not relayed
    await relay.barrier()
    port_of(await relay.cmd(f"L c2 127.0.0.1 {b.port} f t"))
    marker = rtp_packet(7, 2)
    await b.send(marker, p_for_b)
    data, _ = await a.recv()
    assert data == marker  # the early packet never arrived
    assert (await relay.cmd("Q c2 f t")).split()[4] == "1"  # one dropped


async def test_nat_latching_and_stranger_drop(nursery):
    relay = await start_relay(nursery)
    a_sdp = await Peer().bind()
    a_real = await Peer().bind()
    b = await Peer().bind()
    evil = await Peer().bind()
    # the caller's SDP names a_sdp but it really sends from a_real (NAT)
    p_for_b, p_for_a = await call_setup(relay, a_sdp, b, call="nat", ftag="f", ttag="t")
    await a_real.send(rtp_packet(0xAAAA, 1), p_for_a)
    data, _ = await b.recv()
    await b.send(rtp_packet(0xBBBB, 1), p_for_b)
    data, src = await a_real.recv()  # return traffic goes to the learned address
    assert src == ("127.0.0.1", p_for_a)
    # outside the update window (force it) a stranger is dropped
    for st in relay.dispatcher.table.find("nat", "f", None)[0].streams():
        st.last_update = -1e9
    await evil.send(rtp_packet(0xEEEE, 99), p_for_a)
    marker = rtp_packet(0xAAAA, 2)
    await a_real.send(marker, p_for_a)
    data, _ = await b.recv()
    assert data == marker
    # the caller moves (same SSRC, next seq): re-latched
    a_moved = await Peer().bind()
    await a_moved.send(rtp_packet(0xAAAA, 3), p_for_a)
    await b.recv()
    await b.send(rtp_packet(0xBBBB, 2), p_for_b)
    data, src = await a_moved.recv()
    assert src == ("127.0.0.1", p_for_a)


async def test_asymmetric_replies_go_to_sdp_address(nursery):
    relay = await start_relay(nursery)
    a_sdp, a_src, b = await Peer().bind(), await Peer().bind(), await Peer().bind()
    p_for_b, p_for_a = await call_setup(relay, a_sdp, b, call="asym", ftag="f", ttag="t", umods="A")
    await a_src.send(rtp_packet(1, 1), p_for_a)
    await b.recv()
    await b.send(rtp_packet(2, 1), p_for_b)
    data, src = await a_sdp.recv()
    assert src == ("127.0.0.1", p_for_a)


async def test_udp_retransmit_runs_once(nursery):
    relay = await start_relay(nursery)
    r1 = await relay.cmd("U rtx 127.0.0.1 30000 f", cookie="same")
    r2 = await relay.cmd("U rtx 127.0.0.1 30000 f", cookie="same")
    r3 = await relay.cmd("V", cookie="same")
    assert r1 == r2 == r3
    assert await relay.cmd("Gv nsess_created ncmds_rcvd_ndups") == "nsess_created=1 ncmds_rcvd_ndups=2"


async def test_info_and_stats_counters(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b, p_for_a = await call_setup(relay, a, b, call="st", ftag="f", ttag="t")
    await a.send(rtp_packet(1, 1), p_for_a)
    await b.recv()
    info = await relay.cmd("I")
    assert info.split("\n") == [
        "sessions created: 1",
        "active sessions: 1",
        "active streams: 2",
        "packets received: 1",
        "packets transmitted: 1",
    ]
    assert await relay.cmd("Il") == info + "\naverage load: 0.000000"
    g = await relay.cmd("Gv nsess_created nsess_complete npkts_rcvd npkts_relayed total_duration")
    assert g == "nsess_created=1 nsess_complete=1 npkts_rcvd=1 npkts_relayed=1 total_duration=0.000000"
    assert await relay.cmd("G") == ""
    assert await relay.cmd("G nosuch") == "E68"


async def test_hold_keeps_port(nursery):
    relay = await start_relay(nursery)
    r = await relay.cmd("U hold 127.0.0.1 30000 f")
    assert await relay.cmd("U hold 0.0.0.0 30000 f") == r
    assert await relay.cmd("U hold 127.0.0.1 0 f") == r


async def test_new_port_modifier(nursery):
    relay = await start_relay(nursery)
    r1 = await relay.cmd("U np 127.0.0.1 30000 f")
    r2 = await relay.cmd("Un np 127.0.0.1 30000 f")
    assert r1 != r2
    await relay.cmd("L np 127.0.0.1 30002 f t")
    await relay.barrier()
    assert relay.server.engine.nsockets == 4


async def test_sequential_ports_and_exhaustion(nursery):
    relay = await start_relay(nursery, port_min=23820, port_max=23822, sequential=True)
    assert await relay.cmd("U s1 127.0.0.1 30000 f") == "23820 127.0.0.1"
    assert await relay.cmd("L s1 127.0.0.1 30002 f t") == "23822 127.0.0.1"
    assert await relay.cmd("U s2 127.0.0.1 30000 f") == "E72"
    assert await relay.cmd("Un s1 127.0.0.1 30000 f") == "E71"
    assert await relay.cmd("D s1 f") == "0"
    assert await relay.cmd("U s3 127.0.0.1 30000 f") == "23820 127.0.0.1"


async def test_lookup_without_session_and_draining(nursery):
    relay = await start_relay(nursery)
    assert await relay.cmd("L nope 127.0.0.1 3000 f t") == "0"
    await relay.cmd("U old 127.0.0.1 30000 f")
    relay.dispatcher.draining = True
    assert await relay.cmd("U new 127.0.0.1 30000 f") == "E99"
    assert (await relay.cmd("U old 127.0.0.1 30000 f")).endswith("127.0.0.1")


async def test_subcommands(nursery):
    relay = await start_relay(nursery)
    r = await relay.cmd("U sc1 127.0.0.1 12345 f1 t1 && L 127.0.0.1 54321")
    first, second = r.split(" && ")
    assert first.endswith(" 127.0.0.1") and second.endswith(" 127.0.0.1") and first != second
    assert await relay.cmd("Q sc1 f1 t1 && D") == "60 0 0 0 0"
    assert await relay.cmd("Q sc1 f1 t1") == "E50"
    await relay.cmd("U sc2 127.0.0.1 12345 f1 && S ttl=30")
    assert (await relay.cmd("Q sc2 f1")).split()[0] == "30"


async def test_delete_prefix_all_media_lines_and_x(nursery):
    relay = await start_relay(nursery)
    await relay.cmd("U m 127.0.0.1 30000 fA;1")
    await relay.cmd("U m 127.0.0.1 30010 fA;2")
    assert await relay.cmd("C m udp:127.0.0.1:1 fA tB") == "E50"
    assert await relay.cmd("D m fA") == "0"
    assert await relay.cmd("Q m fA;2") == "E50"
    await relay.cmd("U x1 127.0.0.1 30000 f")
    await relay.cmd("U x2 127.0.0.1 30000 f")
    assert await relay.cmd("X") == "0"
    assert (await relay.cmd("I")).startswith("sessions created: 4\nactive sessions: 0")


async def test_ipv6_media(nursery):
    relay = await start_relay(nursery, ifaces=(V6,))
    a = await Peer(socket.AF_INET6, "::1").bind()
    b = await Peer(socket.AF_INET6, "::1").bind()
    ru = await relay.cmd(f"U6 v6 ::1 {a.port} f")
    assert ru.endswith(" ::1 6")
    rl = await relay.cmd(f"L6 v6 ::1 {b.port} f t")
    await a.send(rtp_packet(1, 1), port_of(rl))
    data, src = await b.recv()
    assert src[:2] == ("::1", port_of(ru))
    assert await relay.cmd(f"U v4 127.0.0.1 {a.port} f") == "E36"


async def test_bridge_mode_interfaces(nursery):
    relay = await start_relay(nursery, ifaces=(V4, Iface(socket.AF_INET, "127.0.0.2")), bridge=True)
    assert (await relay.cmd("UIE brE 127.0.0.1 38000 fA")).endswith(" 127.0.0.2")
    assert (await relay.cmd("UEI brD 127.0.0.1 38000 fA")).endswith(" 127.0.0.1")
    assert (await relay.cmd("LIE brD 127.0.0.2 38002 fA tB")).endswith(" 127.0.0.2")
    assert (await relay.cmd("U brN 127.0.0.1 38000 fA")).endswith(" 127.0.0.1")


async def test_advertised_address_without_bridge(nursery):
    relay = await start_relay(nursery, ifaces=(Iface(socket.AF_INET, "127.0.0.1", adv="192.0.2.1"),))
    assert (await relay.cmd("U adv 127.0.0.1 30000 f")).endswith(" 192.0.2.1")


async def test_wildcard_replies_port_only(nursery):
    relay = await start_relay(nursery, ifaces=(Iface(socket.AF_INET, None),))
    assert (await relay.cmd("U w1 127.0.0.1 1000 f")).isdigit()


async def test_setup_and_media_timeouts(nursery, autojump_clock):
    relay = await start_relay(nursery, clock=trio.current_time, ttl=20, setup_ttl=10)
    await relay.cmd("U t1 127.0.0.1 30000 f")
    await relay.cmd("U t2 127.0.0.1 30000 f")
    await relay.cmd("L t2 127.0.0.1 30002 f t")
    await trio.sleep(5)
    assert (await relay.cmd("Q t2 f t")).split()[0] == "15"
    await trio.sleep(5.5)
    assert await relay.cmd("Q t1 f") == "E50"  # -W expired
    assert (await relay.cmd("Q t2 f t")).split()[0] == "10"
    await trio.sleep(10)
    assert await relay.cmd("Q t2 f t") == "E50"
    assert await relay.cmd("G nsess_timeout nsess_destroyed") == "2 2"


async def test_fd_count_back_to_baseline_after_1000_cycles(nursery):
    relay = await start_relay(nursery)
    await assert_fds_back_after_cycles(relay, 1000)
    assert all(t.free == t.size for t in relay.dispatcher.ports.values())


async def test_query_errors_after_session_lookup(nursery):
    relay = await start_relay(nursery)
    assert await relay.cmd("Q nosuch f t bogus") == "E50"
    assert await relay.cmd("Qx nosuch f t") == "E50"
    await relay.cmd("U q 127.0.0.1 30000 f")
    assert await relay.cmd("Q q f t bogus") == "E62"
    assert await relay.cmd("Qx q f t") == "E19"
