"""Behaviours rtpproxy 3.2 has that an earlier pyrtpproxy did differently
(issue 10): each test is one rule, confirmed in rtpproxy's source and by
running it (the same commands are in compat-tests/differential/cases).
Control and media over loopback sockets.
"""

from __future__ import annotations

import socket

import trio
from relayutil import V4, V6, Peer, port_of, rtp_packet, start_relay


async def test_bind_failure_advances_the_port_cursor(nursery):
    """L<addr> with an address that is not local: the bind fails with
    EADDRNOTAVAIL, E72 at once, and the next session starts after that pair."""
    relay = await start_relay(nursery, sequential=True, port_min=40000, port_max=40020)
    assert await relay.cmd("U a 127.0.0.1 1000 f") == "40000 127.0.0.1"
    assert await relay.cmd("UL192.0.2.55 b 127.0.0.1 1000 f") == "E72"
    assert await relay.cmd("U c 127.0.0.1 1000 f") == "40004 127.0.0.1"
    assert await relay.cmd("G ncmds_errs nsess_created") == "1 2"


async def test_ipv6_address_learned_from_l_modifier(nursery):
    """With no -6, U6 is E36 until an L/R modifier brings an IPv6 local
    address; then plain U6/L6 use the newest one learned."""
    relay = await start_relay(nursery, sequential=True, port_min=40100, port_max=40120)
    assert await relay.cmd("U6 a ::1 1000 f") == "E36"
    assert await relay.cmd("U6L[::1] b ::1 1000 f") == "40100 ::1 6"
    assert await relay.cmd("U6 c ::1 1000 f") == "40102 ::1 6"
    assert await relay.cmd("L6 c ::1 1002 f t") == "40104 ::1 6"
    assert await relay.cmd("L6 nosuch ::1 1002 f t") == "0"
    # R learns the local address towards the remote one.
    relay2 = await start_relay(nursery, sequential=True, port_min=40200, port_max=40220)
    assert await relay2.cmd("UR[::1] d ::1 1000 f") == "40200 ::1 6"
    assert await relay2.cmd("U6 e ::1 1000 f") == "40202 ::1 6"


async def test_ipv6_learned_address_relays_media(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer(socket.AF_INET6, "::1").bind(), await Peer(socket.AF_INET6, "::1").bind()
    await relay.cmd("U6L[::1] x ::1 1 f")  # learn ::1
    p_for_b = port_of(await relay.cmd(f"U6 m ::1 {a.port} f"))
    p_for_a = port_of(await relay.cmd(f"L6 m ::1 {b.port} f t"))
    await a.send(rtp_packet(1, 1), p_for_a)
    data, _ = await b.recv()
    assert data == rtp_packet(1, 1)
    await b.send(rtp_packet(2, 1), p_for_b)
    data, _ = await a.recv()
    assert data == rtp_packet(2, 1)


async def test_remote_port_resolved_like_getaddrinfo(nursery):
    """The port is getaddrinfo's service: +N and service names work, and
    65536 + N is port N (htons); media goes to the resulting port."""
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U pr 127.0.0.1 +{a.port} f"))
    p_for_a = port_of(await relay.cmd(f"L pr 127.0.0.1 {65536 + b.port} f t"))
    # Asymmetric: packets go to the address given, no latching needed.
    await relay.cmd(f"UA pr 127.0.0.1 +{a.port} f")
    await relay.cmd(f"LA pr 127.0.0.1 {65536 + b.port} f t")
    await a.send(rtp_packet(1, 1), p_for_a)
    assert (await b.recv())[0] == rtp_packet(1, 1)
    await b.send(rtp_packet(2, 1), p_for_b)
    assert (await a.recv())[0] == rtp_packet(2, 1)
    try:
        socket.getservbyname("sip", "udp")
    except OSError:
        pass  # no services database here: only the numeric forms
    else:
        assert port_of(await relay.cmd("U svc 127.0.0.1 sip f")) > 0
    assert await relay.cmd("U svc2 127.0.0.1 nosuchservice f") == "E37"
    assert await relay.cmd("U svc3 127.0.0.1 -1 f") == "E37"


async def test_weak_flags(nursery):
    relay = await start_relay(nursery)
    # Dw with the creating tag clears stream 1's weak flag (rtpproxy's
    # indexing), so a UW session survives it; D and Dw answer 0 anyway.
    await relay.cmd("UW w1 127.0.0.1 1000 f")
    assert await relay.cmd("Dw w1 f") == "0"
    assert (await relay.cmd("Q w1 f")).startswith("60 ")
    # ... and with the tag as to-tag it clears stream 0's: the session goes.
    assert await relay.cmd("Dw w1 x f") == "0"
    assert await relay.cmd("Q w1 f") == "E50"
    # LW marks the lookup side weak; D then only drops the strong flag.
    await relay.cmd("U w2 127.0.0.1 1000 f")
    await relay.cmd("LW w2 127.0.0.1 1002 f t")
    assert await relay.cmd("D w2 f t") == "0"
    assert (await relay.cmd("Q w2 f t")).startswith("60 ")
    assert await relay.cmd("Dw w2 f t") == "0"  # clears weak[1]
    assert await relay.cmd("Q w2 f t") == "E50"
    assert await relay.cmd("D w2 f t") == "E50"


async def test_subcommand_delete_is_immediate(nursery):
    relay = await start_relay(nursery)
    await relay.cmd("U sd 127.0.0.1 1000 f")
    assert await relay.cmd("Q sd f && D && D") == "60 0 0 0 0 && 0 && -1"
    assert await relay.cmd("Q sd f") == "E50"
    await relay.cmd("U sd2 127.0.0.1 1000 f")
    assert await relay.cmd("Q sd2 f && D") == "60 0 0 0 0"
    assert await relay.cmd("G nsess_destroyed") == "2"


async def test_lookup_of_unknown_session_counts_as_error(nursery):
    relay = await start_relay(nursery)
    assert await relay.cmd("L nosuch 127.0.0.1 1000 f t") == "0"
    assert await relay.cmd("G ncmds_errs ncmds_succd") == "1 0"


async def test_no_rtp_counters_only_for_complete_sessions(nursery):
    relay = await start_relay(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await relay.cmd("U half 127.0.0.1 1000 f")
    await relay.cmd("D half f")
    assert await relay.cmd("G nsess_nortp nsess_nortcp nsess_destroyed") == "0 0 1"
    await relay.cmd(f"U full 127.0.0.1 {a.port} f")
    p_for_a = port_of(await relay.cmd(f"L full 127.0.0.1 {b.port} f t"))
    await a.send(rtp_packet(1, 1), p_for_a)
    assert (await b.recv())[0] == rtp_packet(1, 1)
    await relay.cmd("D full f")
    await relay.cmd("U full2 127.0.0.1 1000 f")
    await relay.cmd("L full2 127.0.0.1 1002 f t")
    await relay.cmd("D full2 f")
    assert await relay.cmd("G nsess_owrtp nsess_nortp nsess_nortcp nsess_owrtcp") == "1 1 2 0"


async def test_new_port_on_one_leg_session_completes_it(nursery, autojump_clock):
    relay = await start_relay(nursery, clock=trio.current_time, ttl=20, setup_ttl=10)
    first = port_of(await relay.cmd("U un 127.0.0.1 1000 f"))
    assert (await relay.cmd("Q un f")).split()[0] == "10"
    second = port_of(await relay.cmd("Un un 127.0.0.1 1000 f"))
    assert second != first
    assert await relay.cmd("G nsess_complete") == "1"
    assert (await relay.cmd("Q un f")).split()[0] == "20"
    await relay.cmd("D un f")
    assert await relay.cmd("G nsess_nortp") == "1"


async def test_v4_v6_peers_are_module_level_helpers():
    # keep the helpers' names in use for ruff (V4/V6 document the defaults)
    assert V4.family == socket.AF_INET and V6.family == socket.AF_INET6


async def test_set_subcommand_targets_the_commands_party(nursery):
    """U ... && S tos=N sets the stream facing the U's party (rtpproxy's
    "in" stream), even before it has a socket; Sr the other one; on Q the
    "in" stream is Q's own."""
    relay = await start_relay(nursery)
    await relay.cmd("U ts 127.0.0.1 1000 f && S tos=42")
    await relay.cmd("L ts 127.0.0.1 1002 f t && S tos=16")
    s = next(iter(relay.dispatcher.table))
    await relay.barrier()

    def tos(st):
        return st.sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)

    assert tos(s.rtp[1]) == 42 and tos(s.rtcp[1]) == 42  # faces the U's party
    assert tos(s.rtp[0]) == 16 and tos(s.rtcp[0]) == 16  # faces the L's party
    await relay.cmd("L ts 127.0.0.1 1002 f t && Sr tos=20")
    await relay.barrier()
    assert tos(s.rtp[1]) == 20
    await relay.cmd("Q ts f t && S tos=8")
    await relay.barrier()
    assert tos(s.rtp[1]) == 8
