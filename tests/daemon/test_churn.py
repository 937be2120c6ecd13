"""Churn: 10^4 U/L/D cycles and 2,000 sessions timing out leave nothing behind.

The baselines are this process's open fds, the UDP ports it has bound and its
RSS, taken (psutil) after a warm-up; after the churn the fds and ports are
exactly back, the session table, the expiry heap and the port tables are
empty, and RSS is back within a margin far below what the churned sessions
would hold if any of them were kept (an allocator does not hand every page
back, so RSS is compared with a margin, not for equality).
"""

from __future__ import annotations

import gc
import os
import resource

import psutil
import pytest
import trio
from relayutil import Peer, port_of, rtp_packet, start_relay

PORT_MIN, PORT_MAX = 24000, 31998  # 4,000 pairs: room for 2,000 sessions at once
CYCLES = 10_000
TIMEOUTS = 2_000
RSS_MARGIN = 6 * 1024 * 1024  # bytes; 10^4 kept sessions would hold ~30 MB
RSS_MARGIN_TIMEOUTS = 2 * 1024 * 1024  # 2,000 kept sessions: ~6 MB


def snapshot(relay) -> dict:
    # The UDP reply cache keeps every reply for 35 s (bounded in entries and
    # bytes): the baseline is taken as if those 35 s had passed.
    relay.server.reply_cache.expire(trio.current_time() + 36)
    gc.collect()
    proc = psutil.Process(os.getpid())
    ports = sorted(
        c.laddr.port
        for c in proc.net_connections(kind="udp")
        if c.laddr and PORT_MIN <= c.laddr.port <= PORT_MAX + 1
    )
    return {"fds": proc.num_fds(), "ports": ports, "rss": proc.memory_info().rss}


def assert_empty(relay) -> None:
    d = relay.dispatcher
    assert len(d.table) == 0 and not d.table.by_callid
    assert d.table.next_deadline() is None
    assert len(d.table._heap) == 0  # no dead sessions kept for their old deadline
    assert relay.server.engine.nsockets == 0
    for t in d.ports.values():
        assert t.free == t.size


async def cycles(relay, n: int, tag: str, a: Peer, b: Peer) -> None:
    for i in range(n):
        cid = f"{tag}{i}"
        pb = port_of(await relay.cmd(f"U {cid} 127.0.0.1 {a.port} f;1"))
        pa = port_of(await relay.cmd(f"L {cid} 127.0.0.1 {b.port} f;1 t;1"))
        if i % 10 == 0:  # some calls carry media both ways
            pkt = rtp_packet(0xA, i)
            await a.send(pkt, pa)
            assert (await b.recv())[0] == pkt
            await b.send(rtp_packet(0xB, i), pb)
            await a.recv()
        assert await relay.cmd(f"D {cid} f t") == "0"
        if i % 500 == 499:
            # as if 35 s had passed: the UDP reply cache lets its replies go
            relay.server.reply_cache.expire(trio.current_time() + 36)


async def test_ul_d_churn_returns_to_baseline(nursery):
    with trio.fail_after(400):
        relay = await start_relay(nursery, port_min=PORT_MIN, port_max=PORT_MAX)
        a, b = await Peer().bind(), await Peer().bind()
        await cycles(relay, 1000, "warm", a, b)  # warm-up: allocator, caches, threads
        await relay.barrier()
        base = snapshot(relay)
        await cycles(relay, CYCLES, "churn", a, b)
        await relay.barrier()
        after = snapshot(relay)
        assert_empty(relay)
        assert after["fds"] == base["fds"]
        assert after["ports"] == base["ports"] == []
        print(f"churn {CYCLES} U/L/D: baseline {base}, after {after}")
        assert after["rss"] - base["rss"] < RSS_MARGIN, (base, after)
        assert relay.dispatcher.counters.nsess_destroyed == CYCLES + 1000
        a.close()
        b.close()


def need_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


async def test_timed_out_sessions_return_to_baseline(nursery):
    need_fds(4 * TIMEOUTS + 1000)  # up to 2,000 sessions of 4 sockets at once
    with trio.fail_after(300):
        # -T 1 / -W 2 on the relay's own clock
        relay = await start_relay(nursery, port_min=PORT_MIN, port_max=PORT_MAX, ttl=1, setup_ttl=2)
        state = {"gone": 0, "want": 0, "event": trio.Event()}

        def on_timeout(s) -> None:
            state["gone"] += 1
            if state["gone"] == state["want"]:
                state["event"].set()

        relay.dispatcher.on_timeout = on_timeout

        async def wave(name: str) -> None:
            state.update(gone=0, want=TIMEOUTS, event=trio.Event())
            for i in range(TIMEOUTS):
                r = await relay.cmd(f"U {name}{i} 127.0.0.1 30000 f;1")
                assert port_of(r) > 0
                if i % 2:  # half of them complete (-T), half only set up (-W)
                    await relay.cmd(f"L {name}{i} 127.0.0.1 30002 f;1 t;1")
            assert len(relay.dispatcher.table) > 0
            await state["event"].wait()
            await relay.barrier()

        await wave("warm")  # the same peak once: allocator, dicts, heap
        base = snapshot(relay)
        await wave("to")
        after = snapshot(relay)
        print(f"{TIMEOUTS} timeouts: baseline {base}, after {after}")
        assert_empty(relay)
        assert relay.dispatcher.counters.nsess_timeout == 2 * TIMEOUTS
        assert after["fds"] == base["fds"]
        assert after["ports"] == base["ports"] == []
        assert after["rss"] - base["rss"] < RSS_MARGIN_TIMEOUTS, (base, after)
