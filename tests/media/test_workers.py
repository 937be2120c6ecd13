"""Sessions served by media worker processes (--workers)."""

from __future__ import annotations

import psutil
from relayutil import Peer, assert_fds_back_after_cycles, port_of, rtp_packet, start_relay


async def two_way(relay, a, b, p_for_a, p_for_b, n=10, seq0=0):
    for seq in range(seq0, seq0 + n):
        pkt = rtp_packet(0xA1, seq, bytes([seq & 0xFF]) * 160)
        await a.send(pkt, p_for_a)
        data, src = await b.recv()
        assert data == pkt and src == ("127.0.0.1", p_for_b)
        back = rtp_packet(0xB2, 1000 + seq)
        await b.send(back, p_for_b)
        data, src = await a.recv()
        assert data == back and src == ("127.0.0.1", p_for_a)


async def test_calls_spread_over_workers_relay_and_count(nursery):
    relay = await start_relay(nursery, workers=2)
    engine = relay.server.engine
    calls = []
    for i in range(4):
        a, b = await Peer().bind(), await Peer().bind()
        p_for_b = port_of(await relay.cmd(f"U w{i} 127.0.0.1 {a.port} f;1"))
        p_for_a = port_of(await relay.cmd(f"L w{i} 127.0.0.1 {b.port} f;1 t;1"))
        calls.append((a, b, p_for_a, p_for_b))
    shards = [s.shard for s in relay.dispatcher.table]
    assert sorted(shards) == [0, 0, 1, 1]
    for a, b, pa, pb in calls:
        await two_way(relay, a, b, pa, pb)
    await relay.barrier()
    assert await relay.cmd("Q w0 f;1 t;1") == "60 10 10 20 0"
    assert await relay.cmd("G npkts_rcvd npkts_relayed") == "80 80"
    assert engine.nsockets == 16
    # re-INVITE from the callee keeps the ports; D frees everything
    a, b, pa, pb = calls[0]
    assert port_of(await relay.cmd(f"U w0 127.0.0.1 {b.port} t;1 f;1")) == pa
    for i in range(4):
        assert await relay.cmd(f"D w{i} f") == "0"
    await relay.barrier()
    assert engine.nsockets == 0
    assert await relay.cmd("G npkts_rcvd npkts_relayed") == "80 80"


async def test_nat_learning_and_new_port_in_a_worker(nursery):
    relay = await start_relay(nursery, workers=1)
    a_sdp, a_real, b = await Peer().bind(), await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U nat 127.0.0.1 {a_sdp.port} f"))
    p_for_a = port_of(await relay.cmd(f"L nat 127.0.0.1 {b.port} f t"))
    await two_way(relay, a_real, b, p_for_a, p_for_b, n=3)
    # a new port for the caller's side keeps the learned address
    p2 = port_of(await relay.cmd(f"Ln nat 127.0.0.1 {b.port} f t"))
    assert p2 != p_for_a
    await two_way(relay, a_real, b, p2, p_for_b, n=3, seq0=3)


async def test_playback_localises_the_session(nursery, tmp_path):
    from pyrtpproxy.media.player import Playback

    relay = await start_relay(nursery, workers=1)
    pb = Playback(relay.dispatcher)
    await nursery.start(pb.run)
    relay.dispatcher.playback = pb
    (tmp_path / "p.0").write_bytes(bytes(range(160)) * 2)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U pl 127.0.0.1 {a.port} f"))
    p_for_a = port_of(await relay.cmd(f"L pl 127.0.0.1 {b.port} f t"))
    await two_way(relay, a, b, p_for_a, p_for_b, n=2)
    s = relay.dispatcher.table.find("pl", "f", None)[0]
    assert s.shard == 0
    assert await relay.cmd(f"P1 pl {tmp_path}/p 0 f t") == "0"
    assert s.shard is None  # now served in-process
    got = []
    for _ in range(4):
        data, src = await a.recv()
        assert src == ("127.0.0.1", p_for_a) and data[1] & 0x7F == 0
        got.append(data[12:])
    assert b"".join(got) == bytes(range(160)) * 2
    # relaying goes on, counters carried over from the worker
    await two_way(relay, a, b, p_for_a, p_for_b, n=2, seq0=2)
    assert (await relay.cmd("Q pl f t")).split()[1:3] == ["4", "4"]


async def test_fd_count_in_both_processes(nursery):
    relay = await start_relay(nursery, workers=2)
    await assert_fds_back_after_cycles(relay, 200)
    workers = [psutil.Process(w.proc.pid) for w in relay.server.engine.workers]
    assert all(w.num_fds() < 20 for w in workers)


async def test_dead_worker_new_sessions_stay_in_process(nursery):
    relay = await start_relay(nursery, workers=1)
    engine = relay.server.engine
    w = engine.workers[0]
    w.proc.kill()
    w.proc.wait()
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U dead 127.0.0.1 {a.port} f"))
    p_for_a = port_of(await relay.cmd(f"L dead 127.0.0.1 {b.port} f t"))
    assert relay.dispatcher.table.find("dead", "f", None)[0].shard is None
    await two_way(relay, a, b, p_for_a, p_for_b, n=2)
    await relay.barrier()
