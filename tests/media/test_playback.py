"""P / S end to end over loopback, plus the player's pure parts."""

from __future__ import annotations

import os
import statistics
import struct
import types

import pytest
import trio
from relayutil import Peer, Relay, port_of, rtp_packet, settings

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.media import player

# pt -> (payload bytes per packet, ms per packet) at the default ptime
FRAMING = {0: (80, 10), 8: (80, 10), 9: (80, 10), 18: (10, 10), 3: (33, 20), 4: (24, 30)}


async def start(nursery, prompt_dir=None, **kw) -> tuple[Relay, player.Playback]:
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    server = Server(settings(**kw), [b])
    pb = player.attach(server, types.SimpleNamespace(prompt_dir=prompt_dir))
    await nursery.start(server.run)
    return Relay(server, b.sockname), pb


async def call(relay, a: Peer, b: Peer, cid="call", umods="", lmods=""):
    """Caller A (fA;1), callee B (tB;1): (port B talks to, port A talks to)."""
    p_for_b = port_of(await relay.cmd(f"U{umods} {cid} 127.0.0.1 {a.port} fA;1"))
    p_for_a = port_of(await relay.cmd(f"L{lmods} {cid} 127.0.0.1 {b.port} fA;1 tB;1"))
    return p_for_b, p_for_a


def make_prompt(dirpath, base, pt, npackets, tail=0):
    chunk = FRAMING[pt][0]
    data = bytes((i * 7 + pt) & 0xFF for i in range(chunk * npackets + tail))
    path = os.path.join(str(dirpath), f"{base}.{pt}")
    with open(path, "wb") as f:
        f.write(data)
    return os.path.join(str(dirpath), base), data


def parse(pkt: bytes):
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", pkt[:12])
    return types.SimpleNamespace(
        v=b0 >> 6, cc=b0 & 0xF, m=b1 >> 7, pt=b1 & 0x7F, seq=seq, ts=ts, ssrc=ssrc, payload=pkt[12:]
    )


async def collect(peer: Peer, n: int, timeout=10.0):
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            data, src = await peer.sock.recvfrom(65535)
            out.append((parse(data), src, trio.current_time()))
    return out


def check_stream(pkts, pt, ms, chunks):
    """RTP header rules, payload == the file's chunks in order."""
    first = pkts[0][0]
    for k, (p, _src, _t) in enumerate(pkts):
        assert p.v == 2 and p.cc == 0 and p.pt == pt
        assert p.m == (1 if k == 0 else 0)
        assert p.ssrc == first.ssrc
        assert p.seq == (first.seq + k) & 0xFFFF
        assert p.ts == (first.ts + k * 8 * ms) & 0xFFFFFFFF
        assert p.payload == chunks[k % len(chunks)]
    assert first.ts % 2 == 0  # rtpproxy starts on an even timestamp


def pacing(pkts, ms):
    """Mean interval (ms), and jitter stats of arrivals against the schedule."""
    t0 = pkts[0][2]
    times = [t for _, _, t in pkts]
    ivals = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    mean = (times[-1] - t0) * 1000 / (len(times) - 1)
    offs = [(t - t0) * 1000 - k * ms for k, t in enumerate(times)]
    dev = [abs(i - ms) for i in ivals]
    print(
        f"\npacing ptime={ms}ms n={len(pkts)}: mean interval {mean:.3f} ms, "
        f"interval |dev| mean {statistics.fmean(dev):.3f} max {max(dev):.3f} ms, "
        f"schedule offset min {min(offs):.3f} max {max(offs):.3f} ms"
    )
    return mean


def within(mean, ms):
    assert ms * 0.75 <= mean <= ms * 1.25, (mean, ms)


async def stats(relay, *names):
    return [int(x) for x in (await relay.cmd("G " + " ".join(names))).split()]


# ---- end to end ------------------------------------------------------------------


@pytest.mark.parametrize("pt", [0, 8, 18, 3, 4, 9])
@pytest.mark.parametrize("party", ["caller", "callee"])
async def test_play_each_codec_to_each_party(nursery, tmp_path, pt, party):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b, p_for_a = await call(relay, a, b)
    chunk, ms = FRAMING[pt]
    n = max(8, 240 // ms)
    base, data = make_prompt(tmp_path, "ann", pt, n, tail=chunk // 2)  # the short tail is not sent
    chunks = [data[i * chunk : (i + 1) * chunk] for i in range(n)]
    if party == "caller":
        dest, src_port, tags = a, p_for_a, "fA;1 tB;1"
    else:
        dest, src_port, tags = b, p_for_b, "tB;1 fA;1"
    assert await relay.cmd(f"P call {base} 99,{pt} {tags}") == "0"
    pkts = await collect(dest, n)
    check_stream(pkts, pt, ms, chunks)
    assert {src for _, src, _ in pkts} == {("127.0.0.1", src_port)}
    within(pacing(pkts, ms), ms)
    await dest.expect_nothing(relay, timeout=3 * ms / 1000)
    assert await stats(relay, "nplrs_created", "nplrs_destroyed", "npkts_played") == [1, 1, n]


async def test_count_three_loops_the_file(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, data = make_prompt(tmp_path, "three", 0, 6, tail=40)
    chunks = [data[i * 80 : (i + 1) * 80] for i in range(6)]
    assert await relay.cmd(f"P3 call {base} 0 fA;1 tB;1") == "0"
    pkts = await collect(a, 18)
    check_stream(pkts, 0, 10, chunks)  # seq/ts continue across the loops, one marker
    within(pacing(pkts, 10), 10)
    await a.expect_nothing(relay, timeout=0.05)
    assert await stats(relay, "npkts_played", "nplrs_destroyed") == [18, 1]


async def test_loop_forever_until_s(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, data = make_prompt(tmp_path, "moh", 8, 4)
    chunks = [data[i * 80 : (i + 1) * 80] for i in range(4)]
    assert await relay.cmd(f"P-1 call {base} 8 tB;1 fA;1") == "0"
    pkts = await collect(b, 30)
    check_stream(pkts, 8, 10, chunks)
    within(pacing(pkts, 10), 10)
    assert await relay.cmd("S call tB;1 fA;1") == "0"
    played = (await stats(relay, "npkts_played"))[0]
    got = 30
    with trio.move_on_after(0.2):  # whatever was already in flight
        while True:
            await b.sock.recv(65535)
            got += 1
    assert got == played
    assert await stats(relay, "nplrs_created", "nplrs_destroyed") == [1, 1]
    assert await relay.cmd("S call tB;1 fA;1") == "0"  # nothing playing: still 0


async def test_relay_suppressed_during_prompt_and_resumed(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b, p_for_a = await call(relay, a, b)
    # both directions flow before the prompt
    await b.send(rtp_packet(0xB0B, 1), p_for_b)
    assert parse((await a.recv())[0]).ssrc == 0xB0B
    base, _ = make_prompt(tmp_path, "hold", 0, 30)  # 300 ms
    assert await relay.cmd(f"P call {base} 0 fA;1 tB;1") == "0"
    first = parse((await a.recv())[0])
    assert first.m == 1
    # during the prompt: B's packets towards A are dropped, A's towards B still go
    for seq in range(2, 8):
        await b.send(rtp_packet(0xB0B, seq), p_for_b)
        await a.send(rtp_packet(0xA0A, seq), p_for_a)
        assert parse((await b.recv())[0]).ssrc == 0xA0A
    seen = [first]
    with trio.fail_after(5):
        while len(seen) < 30:
            seen.append(parse(await a.sock.recv(65535)))
    assert all(p.ssrc == first.ssrc for p in seen)
    assert int((await relay.cmd("Q call fA;1 tB;1")).split()[4]) >= 6
    # the prompt is over: relaying towards A resumes
    await a.expect_nothing(relay, timeout=0.05)
    await b.send(rtp_packet(0xB0B, 9), p_for_b)
    assert parse((await a.recv())[0]).ssrc == 0xB0B


async def test_s_stops_and_relaying_resumes(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b, _ = await call(relay, a, b)
    base, _ = make_prompt(tmp_path, "long", 0, 500)
    assert await relay.cmd(f"P-1 call {base} 0 fA;1 tB;1") == "0"
    p = parse((await a.recv())[0])
    assert await relay.cmd("S call fA;1 tB;1") == "0"
    await b.send(rtp_packet(0xB0B, 1), p_for_b)
    with trio.fail_after(5):
        while True:  # skip prompt packets already in flight
            q = parse(await a.sock.recv(65535))
            if q.ssrc != p.ssrc:
                break
    assert q.ssrc == 0xB0B


async def test_p0_stops_and_new_p_replaces(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, _ = make_prompt(tmp_path, "x", 0, 500)
    assert await relay.cmd(f"P-1 call {base} 0 fA;1 tB;1") == "0"
    first = parse((await a.recv())[0])
    assert await relay.cmd(f"P call {base} 0 fA;1 tB;1") == "0"  # replaces: a new SSRC
    with trio.fail_after(5):
        while (q := parse(await a.sock.recv(65535))).ssrc == first.ssrc:
            pass
    assert q.m == 1
    assert await relay.cmd(f"P0 call {base} 0 fA;1 tB;1") == "0"
    assert await stats(relay, "nplrs_created", "nplrs_destroyed") == [2, 2]
    assert not relay.dispatcher.table.find("call", "fA;1", None)[0].rtp[1].muted


async def test_delete_and_timeout_stop_the_player(nursery, tmp_path):
    relay, pb = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, _ = make_prompt(tmp_path, "x", 0, 10)
    assert await relay.cmd(f"P-1 call {base} 0 fA;1 tB;1") == "0"
    assert await relay.cmd(f"P-1 call {base} 0 tB;1 fA;1") == "0"
    await a.recv()
    await b.recv()
    assert await relay.cmd("D call fA tB") == "0"
    assert await stats(relay, "nplrs_created", "nplrs_destroyed") == [2, 2]
    assert not pb.players
    # timeout: the session's destroy() runs session_gone too
    await call(relay, a, b, cid="t")
    assert await relay.cmd(f"P-1 call2 {base} 0 fA;1 tB;1") == "E50"
    assert await relay.cmd(f"P-1 t {base} 0 fA;1 tB;1") == "0"
    s, _ = relay.dispatcher.table.find("t", "fA;1", None)
    relay.dispatcher.destroy(s, 0.0, timeout=True)
    assert await stats(relay, "nplrs_destroyed") == [3]
    assert not pb.players


async def test_waits_for_the_party_address(nursery, tmp_path):
    """rtpproxy#136: P before the party's address is known starts once it is."""
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    p_for_b = port_of(await relay.cmd(f"U w 127.0.0.1 {a.port} fA;1"))
    base, data = make_prompt(tmp_path, "early", 0, 10)
    assert await relay.cmd(f"P w {base} 0 tB;1 fA;1") == "0"  # to B: unknown yet
    await b.expect_nothing(relay, timeout=0.1)
    assert port_of(await relay.cmd(f"L w 127.0.0.1 {b.port} fA;1 tB;1"))
    pkts = await collect(b, 10)
    check_stream(pkts, 0, 10, [data[i * 80 : (i + 1) * 80] for i in range(10)])
    assert pkts[0][1] == ("127.0.0.1", p_for_b)


async def test_session_codecs_and_ptime(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    # A's codecs; the ptime of prompts towards A is the one B's L asks for
    # (rtpproxy stores Z on the command's own stream, c on the other)
    await call(relay, a, b, umods="c18,8,0", lmods="Z20")
    base, _ = make_prompt(tmp_path, "s", 8, 16)  # 16*80 bytes = 8 packets of 160
    make_prompt(tmp_path, "s", 0, 16)
    # no .18: the first existing one in A's list is .8, packetised at 20 ms
    assert await relay.cmd(f"P call {base} session fA;1 tB;1") == "0"
    pkts = await collect(a, 8)
    assert all(p.pt == 8 and len(p.payload) == 160 for p, _, _ in pkts)
    assert pkts[1][0].ts - pkts[0][0].ts == 160
    within(pacing(pkts, 20), 20)
    # B gave no c list: E35 (after stopping anything that played)
    assert await relay.cmd(f"P call {base} session tB;1 fA;1") == "E35"
    # a U without c clears A's list, a U without Z the ptime it set
    await relay.cmd(f"U call 127.0.0.1 {a.port} fA;1")
    assert await relay.cmd(f"P call {base} session fA;1 tB;1") == "E35"
    await relay.cmd(f"Uc8 call 127.0.0.1 {a.port} fA;1")
    await relay.cmd(f"L call 127.0.0.1 {b.port} fA;1 tB;1")
    assert await relay.cmd(f"P call {base} session fA;1 tB;1") == "0"
    pkts = await collect(a, 16)
    assert all(p.pt == 8 and len(p.payload) == 80 for p, _, _ in pkts[-8:])


async def test_errors(nursery, tmp_path):
    relay, _ = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, _ = make_prompt(tmp_path, "e", 0, 5)
    (tmp_path / "e.99").write_bytes(b"\0" * 800)  # a file, but an unsupported codec
    assert await relay.cmd(f"P nosuch {base} 0 fA;1 tB;1") == "E50"
    assert await relay.cmd(f"P call {base} 8 fA;1 tB;1") == "E60"  # no e.8
    assert await relay.cmd(f"P call {base} 99 fA;1 tB;1") == "E60"
    assert await relay.cmd(f"P call {base} x,0 fA;1 tB;1") == "E60"  # bad list
    assert await relay.cmd(f"P call {base} 8,x fA;1 tB;1") == "E60"
    assert await relay.cmd(f"Px call {base} 0 fA;1 tB;1") == "E17"
    assert await relay.cmd(f"P call {base} session fA;1 tB;1") == "E35"
    assert await relay.cmd(f"P0 call {base} 8 fA;1 tB;1") == "0"
    assert await relay.cmd(f"P call {base}.nope 0 fA;1 tB;1") == "E60"
    assert await relay.cmd("S nosuch fA;1 tB;1") == "E50"
    assert await relay.cmd("Sx call fA;1 tB;1") == "E2"
    assert await relay.cmd("P call fA;1 0 fA tB") == "E50"  # exact tag match only
    assert await stats(relay, "nplrs_created") == [0]
    assert await relay.cmd(f"P call {base} 8,0 fA;1 tB;1") == "0"


async def test_prompt_dir_confines(nursery, tmp_path):
    pdir = tmp_path / "prompts"
    pdir.mkdir()
    (pdir / "sub").mkdir()
    outside = tmp_path / "secret"
    outside.write_bytes(b"\1" * 800)
    (tmp_path / "secret.0").write_bytes(b"\1" * 800)
    make_prompt(pdir, "ok", 0, 5)
    make_prompt(pdir / "sub", "deep", 0, 5)
    os.symlink(tmp_path / "secret.0", pdir / "link.0")
    os.mkfifo(pdir / "fifo.0")
    relay, _ = await start(nursery, prompt_dir=str(pdir))
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)

    async def play(name):
        return await relay.cmd(f"P call {name} 0 fA;1 tB;1")

    assert await play("ok") == "0"
    assert await play("sub/deep") == "0"
    assert await play(f"{pdir}/ok") == "0"  # absolute, inside
    assert await play("sub/../ok") == "0"
    assert await play("../secret") == "E60"
    assert await play(f"{tmp_path}/secret") == "E60"  # absolute, outside
    assert await play("link") == "E60"  # symlink leading out
    assert await play("sub/../../secret") == "E60"
    with trio.fail_after(5):
        assert await play("fifo") == "E60"  # not a regular file; never blocks
    assert await play("/etc/passwd") == "E60"
    assert await play("..") == "E60"


async def test_prompt_read_is_cached_and_reloaded(nursery, tmp_path):
    relay, pb = await start(nursery)
    a, b = await Peer().bind(), await Peer().bind()
    await call(relay, a, b)
    base, _ = make_prompt(tmp_path, "c", 0, 3)
    for _ in range(3):
        assert await relay.cmd(f"P call {base} 0 fA;1 tB;1") == "0"
    assert pb.cache.hits == 2 and len(pb.cache) == 1
    # rewritten (size changes): read again
    with open(f"{base}.0", "wb") as f:
        f.write(b"\x55" * 160)
    assert await relay.cmd(f"P call {base} 0 fA;1 tB;1") == "0"
    while parse((await a.recv())[0]).payload != b"\x55" * 80:
        pass
    assert len(pb.cache) == 2


async def test_ipv6_party(nursery, tmp_path):
    from relayutil import V6

    relay, _ = await start(nursery, ifaces=(V6,))
    import socket

    a = await Peer(socket.AF_INET6, "::1").bind()
    b = await Peer(socket.AF_INET6, "::1").bind()
    await relay.cmd(f"U6 v6 ::1 {a.port} fA;1")
    p_for_a = port_of(await relay.cmd(f"L6 v6 ::1 {b.port} fA;1 tB;1"))
    base, data = make_prompt(tmp_path, "six", 0, 5)
    assert await relay.cmd(f"P v6 {base} 0 fA;1 tB;1") == "0"
    pkts = await collect(a, 5)
    check_stream(pkts, 0, 10, [data[i * 80 : (i + 1) * 80] for i in range(5)])
    assert pkts[0][1][1] == p_for_a


async def test_unconfined_warning(caplog, nursery):
    import logging

    with caplog.at_level(logging.WARNING, logger="pyrtpproxy.media.player"):
        await start(nursery)
    assert any("not confined" in r.getMessage() for r in caplog.records)


# ---- pure parts ---------------------------------------------------------------------


def test_framing_table():
    f = player.framing
    assert f(0, None) == player.Framing(80, 10) == f(8, None) == f(9, None)
    assert f(18, None) == player.Framing(10, 10)
    assert f(3, None) == player.Framing(33, 20)
    assert f(4, None) == player.Framing(24, 30)
    assert f(0, 20) == player.Framing(160, 20)
    assert f(18, 30) == player.Framing(30, 30)
    assert f(3, 30) == player.Framing(66, 40)  # whole frames covering Z30
    assert f(4, 20) == player.Framing(24, 30)
    assert f(99, None) is None and f(101, 20) is None


def test_parse_codecs():
    p = player.parse_codecs
    assert p("0") == [0]
    assert p("99,0") == [99, 0]
    assert p("8x0") == [8, 0]  # any one separator
    assert p("8,,0") == [8, None]
    assert p("x") == [None]
    assert p("") == []
    assert p(" 8, 0") == [8, 0]


def test_packetizer_counts_and_wrap():
    fr = player.Framing(4, 10)
    data = bytes(range(10))  # two whole chunks, a tail of 2
    pk = player.Packetizer.for_count(data, 0, fr, 2, ssrc=1, seq=0xFFFF, ts=0xFFFFFFF0)
    out = []
    while (x := pk.next()) is not None:
        out.append(parse(x))
    assert [p.payload for p in out] == [data[0:4], data[4:8]] * 2
    assert [p.seq for p in out] == [0xFFFF, 0, 1, 2]
    assert [p.ts for p in out] == [0xFFFFFFF0, 0x40, 0x90, 0xE0]
    assert [p.m for p in out] == [1, 0, 0, 0]
    assert player.Packetizer.for_count(b"abc", 0, fr, -1).next() is None  # shorter than a chunk
    forever = player.Packetizer.for_count(data, 0, fr, -7)
    assert all(forever.next() is not None for _ in range(1000))


def test_cache_bound():
    c = player.PromptCache(100)
    c.put(("a",), b"x" * 40)
    c.put(("b",), b"x" * 40)
    assert c.get(("a",)) is not None  # a is now the most recent
    c.put(("c",), b"x" * 40)
    assert c.get(("b",)) is None and c.get(("a",)) and c.get(("c",))
    assert c.total == 80
    c.put(("big",), b"x" * 101)  # larger than the whole cache: not kept
    assert c.get(("big",)) is None and c.total == 80


def test_find_prompt_limits(tmp_path):
    cache = player.PromptCache(1000)
    (tmp_path / "p.0").write_bytes(b"x" * 500)
    base = str(tmp_path / "p")
    assert player.find_prompt(base, [8, 0], None, cache, 1000) == (0, b"x" * 500)
    assert "larger" in player.find_prompt(base, [0], None, cache, 100)
    assert isinstance(player.find_prompt(str(tmp_path), [0], None, cache, 1000), str)
