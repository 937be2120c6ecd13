"""Recording formats byte for byte, readers, checksums and safe file names (pure)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrtpproxy.formats import recfmt as R

T0 = 1700000000.25


def rtp(n: int = 160, seq: int = 1) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x1234) + bytes(range(256))[:n] * 1


# ---- ad-hoc ------------------------------------------------------------------------------
def test_adhoc_record_matches_the_observed_hexdump():
    pkt = rtp(160)
    assert len(pkt) == 172
    rec = R.adhoc_record(("127.0.0.1", 34000), T0, pkt)
    assert len(rec) == 30 + 172
    assert rec[:8] == bytes.fromhex("020084d07f000001")
    assert rec[8:20] == bytes(12)
    assert rec[20:28] == struct.pack("<d", T0)  # x86: host order is little-endian
    assert rec[28:30] == bytes.fromhex("ac00")
    assert rec[30:] == pkt
    three = b"".join(R.adhoc_record(("127.0.0.1", 34000), T0 + i, pkt) for i in range(3))
    assert len(three) == 606


def test_adhoc_ipv6_record():
    rec = R.adhoc_header(("2001:db8::7", 5004, 0, 0), T0, 12)
    fam, port, addr, t, plen = struct.unpack("=H2s16sdH", rec)
    assert fam == socket.AF_INET6 == 10
    assert port == (5004).to_bytes(2, "big")
    assert addr == socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    assert (t, plen) == (T0, 12)


def test_adhoc_reader_round_trip_and_truncation():
    pkts = [(("127.0.0.1", 4000 + i), T0 + i / 50, rtp(20 + i, i)) for i in range(10)]
    pkts.append((("::1", 6000, 0, 0), T0 + 1, b"x"))
    data = b"".join(R.adhoc_record(s, t, p) for s, t, p in pkts)
    rec = R.read_recording(data)
    assert rec.format == "adhoc" and not rec.truncated
    assert [(p.src, p.time, p.data) for p in rec.packets] == [((s[0], s[1]), t, p) for s, t, p in pkts]
    cut = R.read_recording(data[:-1])
    assert cut.truncated and len(cut.packets) == len(pkts) - 1
    with pytest.raises(R.FormatError):
        R.read_recording(b"\x07\x00" + data[2:])


# ---- pcap --------------------------------------------------------------------------------
def test_pcap_file_header_bytes():
    assert R.pcap_file_header() == bytes.fromhex("d4c3b2a1 0200 0400 00000000 00000000 ffff0000 01000000")


def test_pcap_ipv4_record_layout():
    pkt = rtp(160)
    rec = R.pcap_record(("127.0.0.1", 38100), ("127.0.0.1", 21172), T0, pkt, 7)
    assert len(rec) == 230 == 16 + 14 + 20 + 8 + 172
    ts_sec, ts_usec, incl, orig = struct.unpack_from("<IIII", rec)
    assert (ts_sec, ts_usec, incl, orig) == (1700000000, 250000, 214, 214)
    eth = dpkt.ethernet.Ethernet(rec[16:])
    assert eth.dst == bytes.fromhex("00007f000001") and eth.src == bytes.fromhex("00007f000001")
    assert eth.type == 0x0800
    ip = eth.data
    assert (ip.v, ip.hl, ip.tos, ip.len, ip.id, ip.offset, ip.ttl, ip.p) == (4, 5, 0, 200, 7, 0, 127, 17)
    udp = ip.data
    assert (udp.sport, udp.dport, udp.ulen) == (38100, 21172, 180)
    assert udp.data == pkt
    # checksums: recompute with dpkt (it fills in a zero checksum when packing)
    ip2 = dpkt.ip.IP(bytes(ip))
    ip2.sum = 0
    ip2.data.sum = 0
    again = dpkt.ip.IP(bytes(ip2))
    assert again.sum == ip.sum and again.data.sum == udp.sum
    assert R.ones_sum(bytes(ip)[:20]) == 0xFFFF


def test_pcap_ipv6_record_layout():
    pkt = rtp(33)
    src, dst = ("2001:db8::1", 4000, 0, 0), ("2001:db8:0:0:1:2:3:4", 5000, 0, 0)
    rec = R.pcap_record(src, dst, T0, pkt, 0)
    assert len(rec) == 16 + 62 + len(pkt)
    eth = dpkt.ethernet.Ethernet(rec[16:])
    assert eth.type == 0x86DD
    d = socket.inet_pton(socket.AF_INET6, dst[0])
    mac = bytearray(d[:6])
    for i in range(6, 16):
        mac[i % 6] ^= d[i]
    assert eth.dst == bytes(mac) == R.fake_mac(d)
    ip6 = eth.data
    assert (ip6.v, ip6.hlim, ip6.nxt, ip6.plen) == (6, 64, 17, 8 + len(pkt))
    udp = ip6.data
    assert (udp.sport, udp.dport, udp.data) == (4000, 5000, pkt)
    packets = R.read_recording(R.pcap_file_header() + rec).packets
    assert packets[0].checksums_ok and packets[0].dst == ("2001:db8::1:2:3:4", 5000)


def test_split_time_rounds_like_rtpproxy():
    assert R.split_time(10.0000004) == (10, 0)
    assert R.split_time(10.0000006) == (10, 1)
    assert R.split_time(10.9999996) == (11, 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.binary(min_size=0, max_size=41))
def test_ones_sum_matches_a_word_by_word_reference(a, b):
    if len(a) % 2:
        a += b"\0"

    def ref(data):
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return s & 0xFFFF

    assert R.ones_sum(a, b) == ref(a + b)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([("127.0.0.1", "10.1.2.3"), ("::1", "2001:db8::5")]),
            st.integers(1, 65535),
            st.integers(1, 65535),
            st.binary(min_size=0, max_size=1500),
        ),
        max_size=8,
    )
)
def test_pcap_reader_round_trip(items):
    data = bytearray(R.pcap_file_header())
    for i, ((h1, h2), p1, p2, payload) in enumerate(items):
        data += R.pcap_record((h1, p1), (h2, p2), T0 + i, payload, i)
    rec = R.read_recording(bytes(data))
    assert rec.format == "pcap" and not rec.truncated and rec.linktype == 1
    assert [(p.src, p.dst, p.data) for p in rec.packets] == [
        ((a, p1), (b, p2), pl) for (a, b), p1, p2, pl in items
    ]
    assert all(p.checksums_ok for p in rec.packets)
    # dpkt reads it too
    n = sum(1 for _ in dpkt.pcap.Reader(__import__("io").BytesIO(bytes(data))))
    assert n == len(items)


def test_checksum_zero_case_is_written_as_rtpproxy_does():
    # find a payload whose UDP sum folds to 0xffff: rtpproxy writes ~sum = 0 (no fix-up)
    hdr = R.pcap_header(("10.0.0.1", 1), ("10.0.0.2", 2), T0, b"\0\0", 0)
    udp_sum = struct.unpack_from("!H", hdr, 16 + 14 + 20 + 6)[0]
    # a payload word equal to that checksum makes the new sum 0xffff
    payload = struct.pack("!H", udp_sum)
    hdr2 = R.pcap_header(("10.0.0.1", 1), ("10.0.0.2", 2), T0, payload, 0)
    assert struct.unpack_from("!H", hdr2, 16 + 14 + 20 + 6)[0] == 0


@pytest.mark.skipif(shutil.which("tshark") is None and os.geteuid() != 0, reason="tshark not installed")
def test_tshark_accepts_checksums(tmp_path):
    path = tmp_path / "t.pcap"
    with open(path, "wb") as f:
        f.write(R.pcap_file_header())
        for i in range(5):
            f.write(
                R.pcap_record(("127.0.0.1", 38100), ("127.0.0.1", 21172), T0 + i / 50, rtp(160 - i, i), i)
            )
        f.write(R.pcap_record(("::1", 38100, 0, 0), ("::1", 21172, 0, 0), T0 + 1, rtp(161), 5))
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(path),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "ip.id",
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
    assert out[:5] == [f"0x{i:04x},1,1,{180 - i}" for i in range(5)]
    assert out[5] == ",,1,181"


# ---- safe names --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["a84b4c76e66710@pc33.atlanta.com", "1928301774", "abc-DEF_1.2+3:4!~*'()", "été@x"],
)
def test_ordinary_names_are_unchanged(text):
    assert R.encode_component(text) == text
    assert R.session_file_name(text, "fA;1", ".o.rtp") == f"{text}=fA.o.rtp"


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("../../etc/passwd", "%2E.%2F..%2Fetc%2Fpasswd"),
        ("..", "%2E."),
        (".", "%2E"),
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        ("x\0y\x01\x7f", "x%00y%01%7F"),
        (b"\xff\xfe".decode("utf-8", "surrogateescape"), "%FF%FE"),
    ],
)
def test_hostile_names_are_encoded(text, encoded):
    assert R.encode_component(text) == encoded
    assert R.decode_component(encoded) == text


def test_long_names_are_shortened_with_a_hash(tmp_path):
    a = R.session_file_name("x" * 5000, "t", ".o.rtcp")
    b = R.session_file_name("x" * 4999 + "y", "t", ".o.rtcp")
    assert a != b and a.endswith(".o.rtcp") and b.endswith(".o.rtcp")
    assert len(a.encode()) <= 255 and len(b.encode()) <= 255
    c = R.file_name("/" * 300, ".rtp")  # escapes are never cut in half
    assert len(c.encode()) <= 255 and "%2F~" in c
    # and they really can be created
    for name in (a, b, c):
        R.check_component(name)
        open(R.resolve_in(tmp_path, name), "wb").close()
    assert len(os.listdir(tmp_path)) == 3


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=400), st.sampled_from([".o.rtp", ".a.rtcp", ".pcap", ""]))
def test_any_text_gives_one_safe_component(text, suffix):
    name = R.file_name(text, suffix)
    R.check_component(name)
    assert "/" not in name and "\0" not in name and not name.startswith(".")
    assert len(name.encode("utf-8", "surrogateescape")) <= 255
    if len(R.encode_component(text).encode("utf-8", "surrogatepass")) + len(suffix) <= 255:
        assert R.decode_component(name[: len(name) - len(suffix)]) == text


def test_resolve_in_refuses_escapes(tmp_path):
    for bad in ("..", ".", "", "a/b", "x\0"):
        with pytest.raises(ValueError):
            R.resolve_in(tmp_path, bad)
    assert R.resolve_in(tmp_path, "ok.rtp") == os.path.join(os.path.realpath(tmp_path), "ok.rtp")


def test_tag_without_medianum():
    assert R.tag_without_medianum("fA;1") == "fA"
    assert R.tag_without_medianum("fA;1;2") == "fA"
    assert R.tag_without_medianum("fA") == "fA"
