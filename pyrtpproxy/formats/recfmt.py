"""Recording file formats and recording file names, as pure code.

Two formats, byte for byte as rtpproxy writes them (spec section 11):

* **ad-hoc** (the default): no file header; per packet a packed 30-byte
  header then the packet as received::

      u16 family (host order: AF_INET / AF_INET6 of this OS)
      u16 source port (network order)
      u8[16] source address (IPv4: 4 bytes + 12 zero bytes)
      f64 arrival time (host order, Unix epoch seconds)
      u16 packet length (host order)

* **pcap** (``-P``): a classic libpcap file in host byte order (magic
  0xa1b2c3d4, version 2.4, snaplen 65535, link type 1 = Ethernet); per
  packet a record header, a fake Ethernet header (IPv4: the MACs are
  ``00:00`` plus the 4 address bytes; IPv6: the address XOR-folded to 6
  bytes), an IPv4 header (ttl 127, an incrementing id, a real checksum) or an
  IPv6 header (hop limit 64), a UDP header with a real checksum, the payload.

Readers for both formats are here too (``read_recording``); they are what
the WAV tool and the tests use.

File names
----------
rtpproxy builds ``<dir>/<call-id>=<tag><suffix>`` (and ``<dir>/<name>.rtp``
for ``C``) from the controller's text unchanged.  A Call-ID may contain
``/``, so a hostile one could write anywhere.  pyrtpproxy encodes the name
component before using it:

* ``%``, ``/``, NUL, the other control characters (0x01-0x1f, 0x7f) and
  bytes that are not valid UTF-8 are written as ``%XX`` (upper-case hex of
  the byte), so the name is always one path component and can be decoded
  back with ``decode_component``;
* a leading ``.`` is written ``%2E`` (no hidden files, never ``.`` or ``..``);
* a name longer than 255 bytes (the file system limit) is cut and ends with
  ``~`` and 16 hex digits of a BLAKE2b hash of the full original name, before
  the suffix.

Ordinary Call-IDs and tags (letters, digits, ``-.@_+:;!~*'()`` ...) come out
unchanged, so file names match rtpproxy's.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
from collections.abc import Iterator

import attrs

from ..protocol import inet

AF_INET = inet.AF_INET
AF_INET6 = inet.AF_INET6

# ---- layouts (host order where rtpproxy uses host order: '=' is native, unpadded) --
ADHOC_HDR = struct.Struct("=H2s16sdH")  # 30 bytes
PCAP_MAGIC = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_GLOBAL = struct.Struct("=IHHiIII")  # 24 bytes
PCAP_REC = struct.Struct("=IIII")  # 16 bytes
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
_ETHER = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
ETHERTYPE_IP = 0x0800
ETHERTYPE_IPV6 = 0x86DD
IPV4_TTL = 127
IPV6_HLIM = 64
HDR_LEN_V4 = 14 + 20 + 8  # link + IP + UDP bytes before the payload
HDR_LEN_V6 = 14 + 40 + 8
SNAPLEN = 65535

ADHOC_SIZE = ADHOC_HDR.size
assert ADHOC_SIZE == 30 and PCAP_GLOBAL.size == 24 and PCAP_REC.size == 16


class FormatError(ValueError):
    """The bytes are not a recording this module can read."""


# ---- addresses ------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def pack_addr(host: str) -> tuple[int, bytes]:
    """'127.0.0.1' -> (AF_INET, 4 bytes); '::1' -> (AF_INET6, 16 bytes)."""
    return inet.pton(host)


def is_wildcard(host: str | None) -> bool:
    return host is None or host in ("0.0.0.0", "::", "")


def fake_mac(packed: bytes) -> bytes:
    """rtpproxy's fake Ethernet address for an IP address."""
    if len(packed) == 4:
        return b"\x00\x00" + packed
    mac = bytearray(packed[:6])
    for i in range(6, len(packed)):
        mac[i % 6] ^= packed[i]
    return bytes(mac)


def split_time(t: float) -> tuple[int, int]:
    """Seconds and microseconds, rounded like rtpproxy (half away from zero)."""
    sec = math.trunc(t)
    usec = math.floor(1e6 * (t - sec) + 0.5)
    if usec >= 1_000_000:
        sec += 1
        usec = 0
    return sec, usec


# ---- checksums --------------------------------------------------------------------------
def ones_sum(*parts: bytes) -> int:
    """16-bit one's complement sum of the concatenation of ``parts``, folded.

    Every part but the last must have an even length.  The value is the same
    as the classic fold of a 32-bit word sum (0 only if every word is 0).
    """
    total = 0
    nonzero = False
    for p in parts:
        v = int.from_bytes(p, "big")
        if len(p) & 1:
            v <<= 8
        if v:
            nonzero = True
            total += v % 0xFFFF
    total %= 0xFFFF
    if total == 0 and nonzero:
        return 0xFFFF
    return total


def inet_checksum(*parts: bytes) -> int:
    return ~ones_sum(*parts) & 0xFFFF


# ---- writers ------------------------------------------------------------------------------
def adhoc_header(src: tuple, t: float, plen: int) -> bytes:
    """The 30-byte ad-hoc record header for a packet from ``src`` (host, port, ...)."""
    fam, packed = pack_addr(src[0])
    return ADHOC_HDR.pack(fam, (src[1] & 0xFFFF).to_bytes(2, "big"), packed, t, plen & 0xFFFF)


def adhoc_record(src: tuple, t: float, packet: bytes) -> bytes:
    return adhoc_header(src, t, len(packet)) + packet


def pcap_file_header(linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return PCAP_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, linktype)


def pcap_header(src: tuple, dst: tuple, t: float, payload: bytes, ip_id: int) -> bytes:
    """Everything a pcap record holds before ``payload``: record header, fake
    Ethernet, IPv4/IPv6 and UDP headers with valid checksums.

    ``src``/``dst`` are (host, port, ...) of the same address family.
    """
    sfam, saddr = pack_addr(src[0])
    dfam, daddr = pack_addr(dst[0])
    if sfam != dfam:
        raise ValueError("source and destination families differ")
    n = len(payload)
    ulen = 8 + n
    sport = src[1] & 0xFFFF
    dport = dst[1] & 0xFFFF
    sec, usec = split_time(t)
    ip: bytes | bytearray
    if sfam == AF_INET:
        caplen = HDR_LEN_V4 + n
        ether = _ETHER.pack(fake_mac(daddr), fake_mac(saddr), ETHERTYPE_IP)
        ip = bytearray(_IPV4.pack(0x45, 0, 20 + ulen, ip_id & 0xFFFF, 0, IPV4_TTL, 17, 0, saddr, daddr))
        struct.pack_into("!H", ip, 10, inet_checksum(bytes(ip)))
        pseudo = saddr + daddr + b"\x00\x11" + ulen.to_bytes(2, "big")
    else:
        caplen = HDR_LEN_V6 + n
        ether = _ETHER.pack(fake_mac(daddr), fake_mac(saddr), ETHERTYPE_IPV6)
        ip = _IPV6.pack(0x60000000, ulen, 17, IPV6_HLIM, saddr, daddr)
        pseudo = saddr + daddr + ulen.to_bytes(4, "big") + b"\x00\x00\x00\x11"
    csum = inet_checksum(pseudo + _UDP.pack(sport, dport, ulen, 0), payload)
    udp = _UDP.pack(sport, dport, ulen, csum)
    return b"".join((PCAP_REC.pack(sec, usec, caplen, caplen), ether, ip, udp))


def pcap_record(src: tuple, dst: tuple, t: float, payload: bytes, ip_id: int) -> bytes:
    return pcap_header(src, dst, t, payload, ip_id) + payload


# ---- readers ---------------------------------------------------------------------------------
@attrs.frozen
class Packet:
    """One recorded packet, from either format."""

    time: float
    src: tuple[str, int]
    dst: tuple[str, int] | None  # pcap only
    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    ip_id: int | None = None  # pcap IPv4 only
    checksums_ok: bool | None = None  # pcap only: IP header and UDP checksums


@attrs.frozen
class Recording:
    format: str  # "adhoc" | "pcap"
    packets: tuple[Packet, ...]
    truncated: bool = False  # the last record was cut short (still being written?)
    linktype: int | None = None


def _ntop(fam: int, packed: bytes) -> str:
    return inet.ntop(fam, packed)


def _pcap_order(data: bytes) -> str | None:
    """struct byte-order prefix of a pcap file, or None if it is not one."""
    if len(data) < 4:
        return None
    for order in ("=", "<", ">"):
        if struct.unpack_from(order + "I", data)[0] in (PCAP_MAGIC, PCAP_MAGIC_NS):
            return order
    return None


def detect_format(data: bytes) -> str:
    """'pcap', 'adhoc' or 'empty'.

    extractaudio only takes the magic in host order; a byte-swapped pcap is
    read as well here, since nothing else could start with it.
    """
    if not data:
        return "empty"
    return "adhoc" if _pcap_order(data) is None else "pcap"


def iter_adhoc(data: bytes) -> Iterator[Packet]:
    """Records of an ad-hoc file; a cut-short last record is left out."""
    off = 0
    n = len(data)
    while off + ADHOC_SIZE <= n:
        fam, port_b, addr, t, plen = ADHOC_HDR.unpack_from(data, off)
        if fam == AF_INET:
            if any(addr[4:]):
                raise FormatError(f"IPv4 record with a non-zero pad at offset {off}")
            host = _ntop(AF_INET, addr[:4])
        elif fam == AF_INET6:
            host = _ntop(AF_INET6, addr)
        else:
            raise FormatError(f"unknown address family {fam} at offset {off}")
        if not math.isfinite(t):
            raise FormatError(f"bad time at offset {off}")
        start = off + ADHOC_SIZE
        if start + plen > n:
            return
        yield Packet(t, (host, int.from_bytes(port_b, "big")), None, bytes(data[start : start + plen]))
        off = start + plen


def _parse_ip(pkt: bytes, t: float, verify: bool) -> Packet | None:
    """An IPv4/IPv6 datagram carrying UDP -> Packet (None for anything else)."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        total = int.from_bytes(pkt[2:4], "big")
        if pkt[9] != 17 or ihl < 20 or len(pkt) < ihl + 8:
            return None
        ip_id = int.from_bytes(pkt[4:6], "big")
        saddr, daddr = pkt[12:16], pkt[16:20]
        fam = AF_INET
        udp = pkt[ihl : max(total, ihl + 8)]
        ok_ip = ones_sum(pkt[:ihl]) == 0xFFFF if verify else None
        pseudo_tail = b"\x00\x11"
    elif version == 6:
        if len(pkt) < 48 or pkt[6] != 17:
            return None
        ip_id = None
        saddr, daddr = pkt[8:24], pkt[24:40]
        fam = AF_INET6
        plen = int.from_bytes(pkt[4:6], "big")
        udp = pkt[40 : 40 + plen]
        ok_ip = True if verify else None
        pseudo_tail = b""
    else:
        return None
    if len(udp) < 8:
        return None
    sport, dport, ulen, csum = _UDP.unpack_from(udp)
    payload = bytes(udp[8:ulen])
    ok = None
    if verify:
        if csum == 0:
            ok_udp = fam == AF_INET  # optional over IPv4, mandatory over IPv6
        else:
            if fam == AF_INET:
                pseudo = saddr + daddr + pseudo_tail + ulen.to_bytes(2, "big")
            else:
                pseudo = saddr + daddr + ulen.to_bytes(4, "big") + b"\x00\x00\x00\x11"
            ok_udp = ones_sum(pseudo + bytes(udp[:8]), payload) == 0xFFFF
        ok = bool(ok_ip and ok_udp)
    return Packet(t, (_ntop(fam, saddr), sport), (_ntop(fam, daddr), dport), payload, ip_id, ok)


def iter_pcap(data: bytes, *, verify: bool = True) -> Iterator[Packet]:
    """UDP packets of a classic pcap file (Ethernet, DLT_NULL, raw IP, Linux SLL)."""
    order = _pcap_order(data)
    if order is None or len(data) < PCAP_GLOBAL.size:
        raise FormatError("not a pcap file")
    (magic,) = struct.unpack_from(order + "I", data)
    nano = magic == PCAP_MAGIC_NS
    _m, major, minor, _tz, _sf, _snap, linktype = struct.unpack_from(order + "IHHiIII", data)
    if (major, minor) != (2, 4):
        raise FormatError(f"pcap version {major}.{minor}")
    rec = struct.Struct(order + "IIII")
    off = PCAP_GLOBAL.size
    n = len(data)
    while off + rec.size <= n:
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        start = off + rec.size
        if start + incl > n:
            return
        frame = data[start : start + incl]
        off = start + incl
        t = sec + frac / (1e9 if nano else 1e6)
        if linktype == LINKTYPE_ETHERNET:
            if len(frame) < 14:
                continue
            etype = int.from_bytes(frame[12:14], "big")
            if etype not in (ETHERTYPE_IP, ETHERTYPE_IPV6):
                continue
            ip = frame[14:]
        elif linktype == LINKTYPE_NULL:
            ip = frame[4:]
        elif linktype == LINKTYPE_RAW:
            ip = frame
        elif linktype == LINKTYPE_LINUX_SLL:
            ip = frame[16:]
        else:
            raise FormatError(f"unsupported pcap link type {linktype}")
        p = _parse_ip(bytes(ip), t, verify)
        if p is not None:
            yield p


def read_recording(data: bytes, *, verify: bool = True) -> Recording:
    """Parse a whole recording file (either format)."""
    fmt = detect_format(data)
    if fmt == "empty":
        return Recording("adhoc", ())
    if fmt == "pcap":
        pkts = tuple(iter_pcap(data, verify=verify))
        order = _pcap_order(data)
        assert order is not None
        linktype = struct.unpack_from(order + "I", data, 20)[0]
        rec = struct.Struct(order + "IIII")
        off = PCAP_GLOBAL.size
        while off + rec.size <= len(data):
            off += rec.size + rec.unpack_from(data, off)[2]
        return Recording("pcap", pkts, off != len(data), linktype)
    pkts = tuple(iter_adhoc(data))
    consumed = sum(ADHOC_SIZE + len(p.data) for p in pkts)
    return Recording("adhoc", pkts, consumed != len(data))


def read_file(path: str | os.PathLike, *, verify: bool = True) -> Recording:
    with open(path, "rb") as f:
        return read_recording(f.read(), verify=verify)


# ---- safe file names --------------------------------------------------------------------------
NAME_MAX = 255
_HASH_LEN = 16


def _needs_escape(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or o == 0x7F or ch in "%/" or 0xDC80 <= o <= 0xDCFF


def encode_component(text: str) -> str:
    """Percent-encode what must not appear in one file name component.

    ``text`` is the controller's text as the parser decodes it (UTF-8 with
    surrogateescape for invalid bytes).
    """
    out = []
    for ch in text:
        if _needs_escape(ch):
            o = ord(ch)
            if 0xDC80 <= o <= 0xDCFF:
                o -= 0xDC00
            out.append("%%%02X" % o)
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate: its UTF-8 bytes
            out.extend("%%%02X" % b for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    s = "".join(out)
    if s.startswith("."):
        s = "%2E" + s[1:]
    return s


def decode_component(name: str) -> str:
    """The inverse of ``encode_component`` (for names that were not shortened)."""
    raw = bytearray()
    i = 0
    b = name.encode("utf-8", "surrogateescape")
    while i < len(b):
        if b[i] == 0x25 and _ishex(b[i + 1 : i + 3]):
            raw.append(int(b[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(b[i])
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def _ishex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789ABCDEFabcdef" for c in b)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogateescape"))


def file_name(base: str, suffix: str) -> str:
    """One safe component: ``encode_component(base) + suffix``, shortened with a
    hash when it would exceed NAME_MAX bytes.  ``suffix`` is our own ASCII."""
    enc = encode_component(base)
    if _utf8_len(enc) + len(suffix) <= NAME_MAX:
        return enc + suffix
    digest = hashlib.blake2b(base.encode("utf-8", "surrogatepass"), digest_size=_HASH_LEN // 2).hexdigest()
    room = NAME_MAX - len(suffix) - 1 - _HASH_LEN
    cut = []
    used = 0
    i = 0
    while i < len(enc):
        piece = enc[i : i + 3] if enc[i] == "%" else enc[i]
        size = _utf8_len(piece)
        if used + size > room:
            break
        cut.append(piece)
        used += size
        i += len(piece)
    return "".join(cut) + "~" + digest + suffix


def tag_without_medianum(tag: str) -> str:
    """``fA;1`` -> ``fA`` (up to the first ``;``, as rtpproxy does)."""
    return tag.partition(";")[0]


def session_file_name(call_id: str, session_tag: str, suffix: str) -> str:
    """``<call-id>=<tag without ;N><suffix>`` (R and -a)."""
    return file_name(f"{call_id}={tag_without_medianum(session_tag)}", suffix)


def check_component(name: str) -> None:
    """Raise ValueError unless ``name`` is one plain file name component."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"unsafe file name {name!r}")
    if _utf8_len(name) > NAME_MAX:
        raise ValueError("file name too long")


def resolve_in(directory: str | os.PathLike, name: str) -> str:
    """``directory/name`` after checking that it stays inside ``directory``."""
    check_component(name)
    real = os.path.realpath(directory)
    path = os.path.join(real, name)
    if os.path.dirname(path) != real or os.path.commonpath([real, path]) != real:
        raise ValueError(f"{name!r} leaves {directory}")
    return path


__all__ = [
    "ADHOC_HDR",
    "ADHOC_SIZE",
    "FormatError",
    "LINKTYPE_ETHERNET",
    "NAME_MAX",
    "PCAP_MAGIC",
    "Packet",
    "Recording",
    "adhoc_header",
    "adhoc_record",
    "check_component",
    "decode_component",
    "detect_format",
    "encode_component",
    "fake_mac",
    "file_name",
    "inet_checksum",
    "iter_adhoc",
    "iter_pcap",
    "ones_sum",
    "pack_addr",
    "pcap_file_header",
    "pcap_header",
    "pcap_record",
    "read_file",
    "read_recording",
    "resolve_in",
    "session_file_name",
    "split_time",
    "tag_without_medianum",
]
