"""R / C / N / -a end to end: real relayed calls over loopback, files read back."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import dpkt
import pytest
import trio
from relayutil import Peer, Relay, port_of, rtp_packet, settings

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.formats import recfmt
from pyrtpproxy.media.recorder import Channel, RecOptions, Writer, attach

HAVE_TSHARK = shutil.which("tshark") is not None


async def start(nursery, tmp_path, *, rdir=True, spool=False, pcap=False, record_all=False, rtcp=True, **kw):
    rd = tmp_path / "rec"
    sd = tmp_path / "spool"
    if rdir:
        rd.mkdir()
    if spool:
        sd.mkdir()
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    extra = {"clock": kw.pop("clock")} if "clock" in kw else {}
    server = Server(settings(**kw), [b], **extra)
    rec = attach(
        server,
        RecOptions(
            record_dir=str(rd) if rdir else None,
            spool_dir=str(sd) if spool else None,
            pcap=pcap,
            record_all=record_all,
            rtcp=rtcp,
        ),
    )
    await nursery.start(server.run)
    return Relay(server, b.sockname), rec, rd, sd


class Call:
    """Caller A (tag fA;1, the originator: .o) and callee B (tB;1: .a)."""

    def __init__(self, relay: Relay, cid: str = "call"):
        self.relay = relay
        self.cid = cid

    async def setup(self, ftag="fA;1", ttag="tB;1"):
        self.a, self.b = await Peer().bind(), await Peer().bind()
        self.p_for_b = port_of(await self.relay.cmd(f"U {self.cid} 127.0.0.1 {self.a.port} {ftag}"))
        self.p_for_a = port_of(await self.relay.cmd(f"L {self.cid} 127.0.0.1 {self.b.port} {ftag} {ttag}"))
        return self

    async def a_to_b(self, n, start=0, ssrc=0xA1, payload=None):
        """A sends n packets, each checked on arrival at B; returns (sent, t0, t1)."""
        sent = []
        t0 = time.time()
        for i in range(start, start + n):
            pkt = rtp_packet(ssrc, i, payload(i) if payload else bytes([i & 0xFF]) * 160)
            await self.a.send(pkt, self.p_for_a)
            data, _ = await self.b.recv()
            assert data == pkt
            sent.append(pkt)
        return sent, t0, time.time()

    async def b_to_a(self, n, start=0, ssrc=0xB2, payload=None):
        sent = []
        t0 = time.time()
        for i in range(start, start + n):
            pkt = rtp_packet(ssrc, i, payload(i) if payload else bytes([255 - (i & 0xFF)]) * 160)
            await self.b.send(pkt, self.p_for_b)
            data, _ = await self.a.recv()
            assert data == pkt
            sent.append(pkt)
        return sent, t0, time.time()


def read(path) -> recfmt.Recording:
    return recfmt.read_file(path)


def files(d) -> list[str]:
    return sorted(os.listdir(d))


def rtcp_packet(ssrc: int) -> bytes:
    # an RTCP RR with no report blocks
    return bytes([0x80, 201, 0, 1]) + ssrc.to_bytes(4, "big")


# ---- ad-hoc, both directions, spool ------------------------------------------------------
async def test_record_both_directions_adhoc_with_spool(nursery, tmp_path):
    relay, rec, rd, sd = await start(nursery, tmp_path, spool=True)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA tB") == "0"
    assert await relay.cmd("R call tB fA") == "0"
    assert await relay.cmd("R call fA tB") == "0"  # already recorded: still 0
    names = ["call=fA.a.rtcp", "call=fA.a.rtp", "call=fA.o.rtcp", "call=fA.o.rtp"]
    assert files(sd) == names and files(rd) == []
    sent_a, t0, _ = await c.a_to_b(20)
    sent_b, _, _ = await c.b_to_a(20)
    # RTCP both ways (the relay learns the RTCP addresses from the packets)
    ra, rb = await Peer().bind(), await Peer().bind()
    await ra.send(rtcp_packet(0xA1), c.p_for_a + 1)
    await rb.send(rtcp_packet(0xB2), c.p_for_b + 1)
    await rec.sync()
    t1 = time.time()
    await rec.sync()
    assert files(rd) == []  # nothing leaves the spool while the call runs
    assert await relay.cmd("D call fA tB") == "0"
    await rec.sync()
    assert files(sd) == [] and files(rd) == names
    o, a = read(rd / "call=fA.o.rtp"), read(rd / "call=fA.a.rtp")
    assert o.format == a.format == "adhoc" and not o.truncated
    assert [p.data for p in o.packets] == sent_a
    assert [p.data for p in a.packets] == sent_b
    assert {p.src for p in o.packets} == {("127.0.0.1", c.a.port)}
    assert {p.src for p in a.packets} == {("127.0.0.1", c.b.port)}
    times = [p.time for p in o.packets + a.packets]
    assert t0 <= min(times) and max(times) <= t1 and times == sorted(times)
    assert os.path.getsize(rd / "call=fA.o.rtp") == 20 * (30 + 172)
    assert [(p.src, p.data) for p in read(rd / "call=fA.o.rtcp").packets] == [
        (("127.0.0.1", ra.port), rtcp_packet(0xA1))
    ]
    assert [(p.src, p.data) for p in read(rd / "call=fA.a.rtcp").packets] == [
        (("127.0.0.1", rb.port), rtcp_packet(0xB2))
    ]
    st = rec.statistics()
    assert (
        st.files_open == 0 and st.files_closed == 4 and st.pkts_written == 42 and st.pkts_dropped_queue == 0
    )


async def test_one_recorder_per_direction_and_record_matching(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, rtcp=False)
    c = await Call(relay, "reccall").setup()
    assert await relay.cmd("R reccall tB") == "E50"  # tB is not the session's tag
    assert await relay.cmd("R reccall fA") == "0"
    assert files(rd) == ["reccall=fA.o.rtp"]  # -R: no RTCP file
    assert await relay.cmd("R reccall fA tB") == "0"
    assert files(rd) == ["reccall=fA.o.rtp"]
    assert await relay.cmd("R reccall tB fA") == "0"  # the other direction: .a
    assert files(rd) == ["reccall=fA.a.rtp", "reccall=fA.o.rtp"]
    await c.a_to_b(3)
    await c.b_to_a(2)
    assert await relay.cmd("N reccall fA tB") == "0"
    await rec.sync()
    assert len(read(rd / "reccall=fA.o.rtp").packets) == 3
    await c.a_to_b(3, start=3)  # no longer recorded
    assert await relay.cmd("N reccall fA tB") == "E50"
    assert await relay.cmd("NA reccall fA tB") == "0"  # the .a side was still on
    assert await relay.cmd("NA reccall fA tB") == "E50"
    await rec.sync()
    assert len(read(rd / "reccall=fA.o.rtp").packets) == 3
    assert len(read(rd / "reccall=fA.a.rtp").packets) == 2
    assert rec.statistics().files_open == 0


async def test_error_codes(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path)
    await Call(relay).setup()
    for cmd, reply in [
        ("RP call fA", "E6"),
        ("Rx call fA", "E7"),
        ("Nx call fA", "E7"),
        ("NAx call fA", "E6"),
        ("R nocall fA", "E50"),
        ("N nocall fA", "E50"),
        ("N call fA", "E50"),  # nothing recorded
        ("C call foo fA tB", "E50"),  # C matches exactly: the tag is fA;1
        ("C nocall foo fA;1 tB;1", "E50"),
        ("Cp call foo fA;1 tB;1", "E65"),  # p needs a udp: target
        ("C call udp:127.0.0.1 fA;1 tB;1", "E65"),
        ("C call udp:127.0.0.1: fA;1 tB;1", "E65"),
        ("C call udp:127.0.0.1:0 fA;1 tB;1", "E65"),
        ("C call udp:127.0.0.1:65535 fA;1 tB;1", "E65"),
        ("C call udp:127.0.0.1:5x fA;1 tB;1", "E65"),
        ("C call udp::5000 fA;1 tB;1", "E65"),
    ]:
        assert await relay.cmd(cmd) == reply, cmd
    assert files(rd) == []


async def test_without_record_dir(nursery, tmp_path):
    relay, rec, _, _ = await start(nursery, tmp_path, rdir=False)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA") == "E50"
    assert await relay.cmd("C call name fA;1 tB;1") == "E65"
    cp = await Peer().bind()
    assert await relay.cmd(f"C call udp:127.0.0.1:{cp.port} fA;1 tB;1") == "0"  # no -r needed
    sent, _, _ = await c.a_to_b(1)
    data, _ = await cp.recv()
    assert data == sent[0]
    assert await relay.cmd("N call fA") == "0"
    assert os.listdir(tmp_path) == []


# ---- pcap ------------------------------------------------------------------------------------
async def test_record_pcap_both_directions(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, pcap=True)
    c = await Call(relay).setup()
    assert await relay.cmd("Rs call fA tB") == "0"
    assert await relay.cmd("Rs call tB fA") == "0"
    assert await relay.cmd("Rs call tB fA") == "E50"  # single-file: already recorded
    assert files(rd) == ["call=fA.pcap"]
    sent_a, t0, _ = await c.a_to_b(10)
    sent_b, _, t1 = await c.b_to_a(10)
    assert await relay.cmd("D call fA") == "0"
    await rec.sync()
    r = read(rd / "call=fA.pcap")
    assert r.format == "pcap" and r.linktype == 1 and not r.truncated
    assert [p.data for p in r.packets] == sent_a + sent_b
    assert all(p.checksums_ok for p in r.packets)
    assert {(p.src, p.dst) for p in r.packets[:10]} == {(("127.0.0.1", c.a.port), ("127.0.0.1", c.p_for_a))}
    assert {(p.src, p.dst) for p in r.packets[10:]} == {(("127.0.0.1", c.b.port), ("127.0.0.1", c.p_for_b))}
    ids = [p.ip_id for p in r.packets]
    assert ids == list(range(ids[0], ids[0] + 20))
    assert all(t0 <= p.time <= t1 + 1e-6 for p in r.packets)
    # dpkt reads it, every record is 230 bytes, and the size adds up
    with open(rd / "call=fA.pcap", "rb") as f:
        recs = list(dpkt.pcap.Reader(f))
    assert len(recs) == 20 and {len(buf) for _, buf in recs} == {214}
    assert os.path.getsize(rd / "call=fA.pcap") == 24 + 20 * 230


async def test_record_pcap_separate_files_and_tshark(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, pcap=True)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA tB") == "0"
    assert await relay.cmd("R call tB fA") == "0"
    assert files(rd) == ["call=fA.a.rtcp", "call=fA.a.rtp", "call=fA.o.rtcp", "call=fA.o.rtp"]
    sent_a, _, _ = await c.a_to_b(5)
    sent_b, _, _ = await c.b_to_a(5)
    assert await relay.cmd("X") == "0"  # X closes every recording too
    await rec.sync()
    o, a = read(rd / "call=fA.o.rtp"), read(rd / "call=fA.a.rtp")
    assert [p.data for p in o.packets] == sent_a and [p.data for p in a.packets] == sent_b
    assert read(rd / "call=fA.o.rtcp").packets == ()  # a pcap header only
    assert os.path.getsize(rd / "call=fA.o.rtcp") == 24
    if not HAVE_TSHARK:
        if os.geteuid() != 0:
            pytest.skip("tshark is not installed")
        pytest.fail("tshark is not installed (make test installs it)")
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(rd / "call=fA.o.rtp"),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "ip.src",
            "-e",
            "udp.srcport",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
            "-e",
            "ip.checksum.status",
            "-e",
            "udp.checksum.status",
            "-e",
            "udp.length",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == [f"127.0.0.1,{c.a.port},127.0.0.1,{c.p_for_a},1,1,180"] * 5


async def test_rs_without_pcap_is_plain_r(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path)
    await Call(relay).setup()
    assert await relay.cmd("Rs call fA") == "0"
    assert files(rd) == ["call=fA.o.rtcp", "call=fA.o.rtp"]


async def test_single_file_joins_an_existing_recorder(nursery, tmp_path):
    # spec: `R pc fA` then `Rs pc tB fA` put every packet into pc=fA.o.rtp
    relay, rec, rd, _ = await start(nursery, tmp_path, pcap=True)
    c = await Call(relay, "pc").setup()
    assert await relay.cmd("R pc fA") == "0"
    assert await relay.cmd("Rs pc tB fA") == "0"
    await c.a_to_b(2)
    await c.b_to_a(2)
    assert await relay.cmd("D pc fA") == "0"
    await rec.sync()
    assert files(rd) == ["pc=fA.o.rtcp", "pc=fA.o.rtp"]
    assert len(read(rd / "pc=fA.o.rtp").packets) == 4


async def test_media_number_sessions_share_the_file(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, rtcp=False)
    c1 = await Call(relay, "mm").setup("fA;1", "tB;1")
    c2 = await Call(relay, "mm").setup("fA;2", "tB;2")
    assert await relay.cmd("R mm fA") == "0"  # prefix: both m-lines
    s1, _, _ = await c1.a_to_b(3, ssrc=1)
    s2, _, _ = await c2.a_to_b(3, ssrc=2)
    assert await relay.cmd("N mm fA") == "0"
    await rec.sync()
    assert files(rd) == ["mm=fA.o.rtp"]
    assert [p.data for p in read(rd / "mm=fA.o.rtp").packets] == s1 + s2


# ---- C ---------------------------------------------------------------------------------------
async def test_copy_to_a_file(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path)
    c = await Call(relay, "cp2").setup()
    assert await relay.cmd("C cp2 myrec fA tB") == "E50"
    assert await relay.cmd("C cp2 myrec fA;1 tB;1") == "0"
    assert await relay.cmd("C cp2 myrec fA;1 tB;1") == "0"  # already copied
    assert await relay.cmd("C cp2 ../evil tB;1 fA;1") == "0"
    await c.a_to_b(2)
    await c.b_to_a(1)
    assert await relay.cmd("D cp2 fA") == "0"
    await rec.sync()
    assert files(rd) == ["%2E.%2Fevil.rtcp", "%2E.%2Fevil.rtp", "myrec.rtcp", "myrec.rtp"]
    assert os.path.getsize(rd / "myrec.rtp") == 404  # 2 x (30 + 172), as observed
    assert len(read(rd / "%2E.%2Fevil.rtp").packets) == 1
    assert os.listdir(tmp_path) == ["rec"]


async def _peer_pair() -> tuple[Peer, Peer]:
    """Two loopback endpoints on ports P and P+1 (RTP and RTCP of a copy target)."""
    for _ in range(50):
        a = await Peer().bind()
        b = Peer()
        try:
            await b.bind(a.port + 1)
            return a, b
        except OSError:
            a.close()
            b.close()
    raise RuntimeError("no consecutive ports")


async def test_copy_to_udp(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path)
    c = await Call(relay, "cpcall").setup()
    cp, cp_rtcp = await _peer_pair()
    assert await relay.cmd(f"C cpcall udp:127.0.0.1:{cp.port} fA tB") == "E50"
    assert await relay.cmd(f"C cpcall udp:127.0.0.1:{cp.port} fA;1 tB;1") == "0"
    cq = await Peer().bind()
    reply = await relay.cmd(f"CP cpcall udp:localhost:{cq.port} tB;1 fA;1")
    qport, qaddr = reply.split()
    assert qaddr == "127.0.0.1" and 40000 <= int(qport) <= 44998
    sent_a, _, _ = await c.a_to_b(5)
    srcs = set()
    for pkt in sent_a:
        data, src = await cp.recv()
        assert data == pkt
        srcs.add(src)
    assert len(srcs) == 1
    (cport,) = {s[1] for s in srcs}
    assert 40000 <= cport <= 44998 and cport % 2 == 0
    sent_b, _, _ = await c.b_to_a(3)
    for pkt in sent_b:
        data, src = await cq.recv()
        assert data == pkt and src == ("127.0.0.1", int(qport))
    ra = await Peer().bind()
    await ra.send(rtcp_packet(5), c.p_for_a + 1)
    data, src = await cp_rtcp.recv()
    assert data == rtcp_packet(5) and src == ("127.0.0.1", cport + 1)
    table = relay.dispatcher.ports[socket.AF_INET]
    assert {cport, int(qport)} <= set(table.in_use)
    assert rec.statistics().copies_sent == 9
    assert await relay.cmd("D cpcall fA") == "0"
    await rec.sync()
    assert not ({cport, int(qport)} & set(table.in_use))
    assert files(rd) == []


async def test_copy_again_binds_a_new_pair(nursery, tmp_path):
    """rtpproxy: every remote C binds a new pair; when the stream already has
    a copy the pair is closed again, Cp answers its port, and the copies keep
    going to the first target.  IPv6 targets are refused (E65)."""
    relay, rec, rd, _ = await start(nursery, tmp_path)
    c = await Call(relay, "cpx").setup()
    cp = await Peer().bind()
    first = (await relay.cmd(f"Cp cpx udp:127.0.0.1:{cp.port} fA;1 tB;1")).split()
    cq = await Peer().bind()
    second = (await relay.cmd(f"Cp cpx udp:127.0.0.1:{cq.port} fA;1 tB;1")).split()
    assert second[1] == first[1] == "127.0.0.1"
    assert int(second[0]) != int(first[0])
    table = relay.dispatcher.ports[socket.AF_INET]
    assert int(second[0]) not in table.in_use and int(first[0]) in table.in_use
    assert await relay.cmd(f"C cpx udp:[::1]:{cq.port} fA;1 tB;1") == "E65"
    assert await relay.cmd(f"C cpx udp:::1:{cq.port} tB;1 fA;1") == "E65"
    sent, _, _ = await c.a_to_b(2)
    for pkt in sent:
        data, src = await cp.recv()
        assert data == pkt and src[1] == int(first[0])
    assert await relay.cmd("D cpx fA") == "0"


# ---- -a --------------------------------------------------------------------------------------
async def test_record_all_adhoc(nursery, tmp_path):
    relay, rec, rd, sd = await start(nursery, tmp_path, record_all=True, spool=True)
    c = await Call(relay, "all").setup()
    assert files(sd) == ["all=fA.a.rtcp", "all=fA.a.rtp", "all=fA.o.rtcp", "all=fA.o.rtp"]
    assert await relay.cmd("R all fA") == "0"
    s_a, _, _ = await c.a_to_b(4)
    s_b, _, _ = await c.b_to_a(4)
    assert await relay.cmd("D all fA") == "0"
    await rec.sync()
    assert files(sd) == [] and len(files(rd)) == 4
    assert [p.data for p in read(rd / "all=fA.o.rtp").packets] == s_a
    assert [p.data for p in read(rd / "all=fA.a.rtp").packets] == s_b


async def test_record_all_pcap_single_file(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, record_all=True, pcap=True)
    c = await Call(relay, "allp").setup()
    assert files(rd) == ["allp=fA.pcap"]
    s_a, _, _ = await c.a_to_b(3)
    s_b, _, _ = await c.b_to_a(3)
    ra = await Peer().bind()
    await ra.send(rtcp_packet(9), c.p_for_a + 1)
    await rec.sync()
    assert await relay.cmd("D allp fA") == "0"
    await rec.sync()
    r = read(rd / "allp=fA.pcap")
    assert [p.data for p in r.packets] == s_a + s_b + [rtcp_packet(9)]
    # single-file RTCP is written as it leaves the relay (rtpproxy's quirk)
    assert r.packets[-1].src == ("127.0.0.1", c.p_for_b + 1)
    assert all(p.checksums_ok for p in r.packets)


# ---- hostile names ----------------------------------------------------------------------------
async def test_hostile_call_ids_stay_inside_the_recording_dir(nursery, tmp_path):
    relay, rec, rd, sd = await start(nursery, tmp_path, record_all=True, spool=True)
    hostile = [
        "../../evil",
        "a/../../b",
        "/etc/passwd",
        "..",
        ".",
        ".hidden",
        "%2e%2e%2fx",
        "long" + "x" * 1000,
        "../" * 200,
    ]
    for i, cid in enumerate(hostile):
        tag = "../t" if i % 2 else "t/../../x"
        assert port_of(await relay.cmd(f"U {cid} 127.0.0.1 {4000 + 2 * i} {tag}")) > 0
    # bytes that are not UTF-8, a NUL is refused by the parser (E5)
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    for raw, want in (
        (b"k1 U \xff/../\xfe 127.0.0.1 5000 ../f\n", None),
        (b"k2 U x\x00y 127.0.0.1 5000 f\n", b"k2 E5"),
    ):
        await s.sendto(raw, relay.addr)
        with trio.fail_after(5):
            reply = await s.recv(1000)
        assert reply.startswith(raw[:3]) and (want is None or reply.startswith(want)), reply
    s.close()
    assert await relay.cmd("X") == "0"
    await rec.sync()
    made = []
    for root, _dirs, fs in os.walk(tmp_path):
        for f in fs:
            made.append(os.path.join(root, f))
    assert made and all(os.path.dirname(p) == str(rd) for p in made), made
    assert files(sd) == []
    names = files(rd)
    assert len(names) == 4 * (len(hostile) + 1)
    assert "%2E.%2F..%2Fevil=t%2F..%2F..%2Fx.o.rtp" in names
    assert "%FF%2F..%2F%FE=..%2Ff.a.rtp" in names
    assert all(len(n.encode()) <= 255 and not n.startswith(".") for n in names)
    decoded = {recfmt.decode_component(n.rsplit("=", 1)[0]) for n in names if "~" not in n}
    assert "/etc/passwd" in decoded and ".." in decoded


async def test_planted_links_are_replaced_not_followed(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, rtcp=False)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, rd / "call=fA.o.rtp")
    os.link(victim, rd / "call=fA.a.rtp")
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA tB") == "0" and await relay.cmd("R call tB fA") == "0"
    await c.a_to_b(2)
    assert await relay.cmd("D call fA") == "0"
    await rec.sync()
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(rd / "call=fA.o.rtp")
    assert len(read(rd / "call=fA.o.rtp").packets) == 2


async def test_rotated_recording_dir_and_quick_restart(nursery, tmp_path):
    relay, rec, rd, sd = await start(nursery, tmp_path, spool=True, rtcp=False)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA") == "0"
    await c.a_to_b(2)
    # N then R while the old file is still being closed (the writer is
    # held up): the new file replaces the old one once that was moved
    gate = threading.Event()
    rec.writer.submit(gate.wait)
    assert await relay.cmd("N call fA") == "0"
    assert await relay.cmd("R call fA") == "0"
    old = [c for c in rec.closing if c.name == "call=fA.o.rtp"]
    assert len(old) == 1 and not old[0].closed
    assert rec.by_name["call=fA.o.rtp"].fd == -2  # opened by the writer, after the close
    sent, _, _ = await c.a_to_b(3, start=2)
    gate.set()
    assert await relay.cmd("N call fA") == "0"
    await rec.sync()
    assert files(sd) == [] and [p.data for p in read(rd / "call=fA.o.rtp").packets] == sent
    # the operator rotates -r: new recordings go to the new directory
    os.rename(rd, tmp_path / "rec.old")
    rd.mkdir()
    assert await relay.cmd("R call tB fA") == "0"
    await c.b_to_a(1)
    assert await relay.cmd("D call fA") == "0"
    await rec.sync()
    assert files(rd) == ["call=fA.a.rtp"] and files(tmp_path / "rec.old") == ["call=fA.o.rtp"]


# ---- life cycle: timeout, disk errors, bounded queue ---------------------------------------------
async def test_timeout_closes_and_moves_files(nursery, tmp_path, autojump_clock):
    relay, rec, rd, sd = await start(
        nursery, tmp_path, spool=True, clock=trio.current_time, ttl=20, setup_ttl=10
    )
    await Call(relay, "to").setup()
    assert await relay.cmd("R to fA tB") == "0"
    assert len(files(sd)) == 2
    await trio.sleep(30)
    assert await relay.cmd("Q to fA;1 tB;1") == "E50"
    await rec.sync()
    assert files(sd) == [] and files(rd) == ["to=fA.o.rtcp", "to=fA.o.rtp"]


async def test_disk_error_stops_only_that_recording(nursery, tmp_path, caplog):
    relay, rec, rd, _ = await start(nursery, tmp_path, rtcp=False)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA tB") == "0"
    assert await relay.cmd("R call tB fA") == "0"
    s = relay.dispatcher.table.find("call", "fA;1", None)[0]
    ch = rec.taps[s.rtp[1]].sink
    await c.a_to_b(2)
    await rec.sync()
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, ch.fd)  # the disk is full from now on
    os.close(full)
    with caplog.at_level(logging.ERROR, logger="pyrtpproxy.media.recorder"):
        await c.a_to_b(5, start=2)
        await rec.sync()
        await c.a_to_b(5, start=7)  # the call goes on
        sent_b, _, _ = await c.b_to_a(5)
        await rec.sync()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    st = rec.statistics()
    assert st.write_errors == 1 and st.pkts_lost_error == 5
    assert await relay.cmd("D call fA") == "0"
    await rec.sync()
    assert [p.data for p in read(rd / "call=fA.a.rtp").packets] == sent_b
    assert len(read(rd / "call=fA.o.rtp").packets) == 2


async def test_a_stalled_disk_never_stalls_the_relay(nursery, tmp_path):
    relay, rec, rd, _ = await start(nursery, tmp_path, rtcp=False)
    c = await Call(relay).setup()
    assert await relay.cmd("R call fA tB") == "0"
    rec.writer.max_pkts = 50
    gate = threading.Event()
    rec.writer.submit(gate.wait)  # the writer is stuck on the disk
    try:
        with trio.fail_after(10):
            sent, t0, t1 = await c.a_to_b(100)  # every packet still relayed at once
            await c.b_to_a(10)
    finally:
        gate.set()
    assert rec.statistics().pkts_dropped_queue == 50
    assert await relay.cmd("D call fA") == "0"
    await rec.sync()
    assert [p.data for p in read(rd / "call=fA.o.rtp").packets] == sent[:50]


async def test_open_error_is_an_error_reply_and_the_call_goes_on(nursery, tmp_path, monkeypatch, caplog):
    import pyrtpproxy.media.recorder as recorder_mod

    relay, rec, rd, _ = await start(nursery, tmp_path)
    c = await Call(relay).setup()

    def denied(name, dir_fd):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(recorder_mod, "create_file", denied)
    with caplog.at_level(logging.ERROR, logger="pyrtpproxy.media.recorder"):
        assert await relay.cmd("R call fA") == "E50"
        assert await relay.cmd("C call name fA;1 tB;1") == "E65"
    assert rec.statistics().open_errors == 2
    assert any("Permission denied" in r.getMessage() for r in caplog.records)
    await c.a_to_b(3)  # relaying is untouched
    monkeypatch.undo()
    assert await relay.cmd("R call fA") == "0"


async def test_capabilities(nursery, tmp_path):
    relay, _, _, _ = await start(nursery, tmp_path)
    for code in ("20071218", "20200226", "20250523"):
        assert await relay.cmd(f"VF {code}") == "1"


def test_options_from_the_command_line():
    from pyrtpproxy.daemon.cli import build_config

    cfg = build_config(["-f", "-F", "-s", "udp:127.0.0.1:22222", "-r", "/r", "-S", "/s", "-P", "-a", "-R"])
    assert RecOptions.from_config(cfg) == RecOptions("/r", "/s", pcap=True, record_all=True, rtcp=False)
    cfg = build_config(["-f", "-F", "-s", "udp:127.0.0.1:22222"])
    assert RecOptions.from_config(cfg) == RecOptions()


def test_writer_bound_drops_and_counts(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    ch = Channel(name="f", fd=fd, spool=False, pcap=False, single=False, label="f")
    w = Writer(max_pkts=10)
    w.start()
    gate = threading.Event()
    w.submit(gate.wait)  # the disk "stalls"
    hook = w.make_file_hook(ch)

    class St:
        is_rtcp = False

    t0 = time.monotonic()
    for i in range(25):
        hook(bytes([i]) * 20, ("127.0.0.1", 1000), St())
    assert time.monotonic() - t0 < 0.5  # the media thread never waits
    assert w.ndropped == 15
    gate.set()
    assert w.stop([ch], timeout=10)
    r = read(tmp_path / "f")
    assert [p.data[0] for p in r.packets] == list(range(10))


# ---- the real process: SIGTERM / SIGINT --------------------------------------------------------
def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctl(addr, text, timeout=5.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        cookie = f"k{time.monotonic_ns()}"
        while time.monotonic() < deadline:
            s.sendto(f"{cookie} {text}".encode(), addr)
            try:
                data = s.recv(65535).decode()
            except (TimeoutError, ConnectionRefusedError):
                continue
            c, _, reply = data.partition(" ")
            if c == cookie:
                return reply.strip()
        raise TimeoutError(text)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_complete_files(tmp_path, sig):
    rd, sd = tmp_path / "rec", tmp_path / "spool"
    rd.mkdir()
    sd.mkdir()
    port = _free_udp_port()
    ctl = ("127.0.0.1", port)
    argv = [
        sys.executable,
        "-m",
        "pyrtpproxy",
        "-f",
        "-F",
        "-s",
        f"udp:127.0.0.1:{port}",
        "-l",
        "127.0.0.1",
        "-m",
        "46000",
        "-M",
        "46999",
        "-p",
        str(tmp_path / "pid"),
        "-r",
        str(rd),
        "-S",
        str(sd),
        "-d",
        "INFO",
    ]
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _ctl(ctl, "V", timeout=15) == "20040107"
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for x in (a, b):
            x.bind(("127.0.0.1", 0))
            x.settimeout(5)
        p_for_b = int(_ctl(ctl, f"U sig 127.0.0.1 {a.getsockname()[1]} fA;1").split()[0])
        p_for_a = int(_ctl(ctl, f"L sig 127.0.0.1 {b.getsockname()[1]} fA;1 tB;1").split()[0])
        assert _ctl(ctl, "R sig fA tB") == "0" and _ctl(ctl, "R sig tB fA") == "0"
        sent_a, sent_b = [], []
        for i in range(300):
            pa, pb = rtp_packet(1, i), rtp_packet(2, i)
            a.sendto(pa, ("127.0.0.1", p_for_a))
            assert b.recv(2048) == pa
            b.sendto(pb, ("127.0.0.1", p_for_b))
            assert a.recv(2048) == pb
            sent_a.append(pa)
            sent_b.append(pb)
        assert os.listdir(rd) == []  # still spooled
        proc.send_signal(sig)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert os.listdir(sd) == []
    assert files(rd) == ["sig=fA.a.rtcp", "sig=fA.a.rtp", "sig=fA.o.rtcp", "sig=fA.o.rtp"]
    assert [p.data for p in read(rd / "sig=fA.o.rtp").packets] == sent_a
    assert [p.data for p in read(rd / "sig=fA.a.rtp").packets] == sent_b
    assert os.path.getsize(rd / "sig=fA.a.rtp") == 300 * 202
