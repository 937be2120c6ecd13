"""pyrtpproxy-extract: turn a recording into a WAV file (what extractaudio does).

Usage (the same shape as rtpproxy's extractaudio)::

    pyrtpproxy-extract [-s] [-e] <base> <out.wav>
    pyrtpproxy-extract [-s] [-e] [-A <answer-file>] [-B <originate-file>] <out.wav>
    pyrtpproxy-extract -S <base>           (or -S -A file -B file)

``<base>`` names a recording without its suffix: ``<base>.a.rtp`` (the
answering party, channel A) and ``<base>.o.rtp`` (the originator, channel B)
are read, in either format (ad-hoc or pcap, detected from the content).
When ``<base>`` is itself a file (a single-file ``.pcap`` from ``Rs`` or
``-a -P``), its first direction heard is channel A and the other B.

Packets are grouped per direction and SSRC, and each group is placed by its
RTP timestamps, starting at its first packet's arrival time; gaps (lost
packets, silence suppression, other payload types) are silence.  PCMU (0)
and PCMA (8) are decoded; anything else is skipped.  The output is 16-bit
PCM at 8 kHz: one channel ((A + B) / 2, like extractaudio) or, with ``-s``,
two (A left, B right).

``-S`` only prints ``<file>: <number of packets>`` per input.
"""

from __future__ import annotations

import argparse
import array
import os
import sys
import wave
from collections.abc import Iterable, Sequence

import attrs

from ..formats import g711, recfmt

RATE = 8000
MAX_SKEW = 60 * RATE  # timestamps and arrival times may disagree this much
MAX_SAMPLES = 24 * 3600 * RATE  # refuse to make a WAV longer than a day


@attrs.frozen
class RtpPacket:
    time: float
    pt: int
    seq: int
    ts: int
    ssrc: int
    payload: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


def parse_rtp(data: bytes, t: float) -> RtpPacket | None:
    """An RTP packet, or None for RTCP and anything unparsable."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    if 72 <= pt <= 76:  # RTCP SR/RR/SDES/BYE/APP (200-204 with the marker bit)
        return None
    cc = data[0] & 0x0F
    off = 12 + 4 * cc
    if data[0] & 0x10:  # header extension
        if len(data) < off + 4:
            return None
        off += 4 + 4 * int.from_bytes(data[off + 2 : off + 4], "big")
    end = len(data)
    if data[0] & 0x20:  # padding
        pad = data[-1]
        if pad == 0 or pad > end - off:
            return None
        end -= pad
    if off > end:
        return None
    return RtpPacket(
        t,
        pt,
        int.from_bytes(data[2:4], "big"),
        int.from_bytes(data[4:8], "big"),
        int.from_bytes(data[8:12], "big"),
        bytes(data[off:end]),
    )


def _sdiff32(a: int, b: int) -> int:
    """a - b for 32-bit RTP timestamps, as a signed number."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d & 0x80000000 else d


def load_packets(path: str) -> list[recfmt.Packet]:
    """Every packet of one recording file (raises OSError / FormatError)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise recfmt.FormatError("empty file")
    return list(recfmt.read_recording(data, verify=False).packets)


def split_directions(packets: Sequence[recfmt.Packet]) -> tuple[list, list]:
    """A single-file recording: first direction heard -> A, the others -> B.

    A direction is the relay socket the packet reached (pcap ``dst``), or its
    sender where there is no destination (ad-hoc).
    """
    first = None
    a, b = [], []
    for p in packets:
        key = p.dst if p.dst is not None else p.src
        if first is None:
            first = key
        (a if key == first else b).append(p)
    return a, b


def _substreams(packets: Iterable[recfmt.Packet]) -> list[list[RtpPacket]]:
    groups: dict[int, list[RtpPacket]] = {}
    for p in packets:
        r = parse_rtp(p.data, p.time)
        if r is None:
            continue
        groups.setdefault(r.ssrc, []).append(r)
    return list(groups.values())


def render(
    channels: Sequence[Iterable[recfmt.Packet]],
) -> tuple[list[array.array], dict[str, int]]:
    """Decode each channel's packets into 8 kHz 16-bit samples on one time line.

    Returns one ``array('h')`` per channel (all of the same length) and
    counters (packets decoded, skipped).
    """
    subs_per_ch = [_substreams(pkts) for pkts in channels]
    firsts = [min(r.time for r in sub) for subs in subs_per_ch for sub in subs if sub]
    stats = {"decoded": 0, "skipped": 0}
    if not firsts:
        return [array.array("h") for _ in channels], stats
    base = min(firsts)
    placed: list[list[tuple[int, bytes]]] = []
    length = 0
    for subs in subs_per_ch:
        chunks: list[tuple[int, bytes]] = []
        for sub in subs:
            sub.sort(key=lambda r: r.time)
            anchor = sub[0]
            start = round((anchor.time - base) * RATE)
            for r in sub:
                dec = g711.DECODERS.get(r.pt)
                if dec is None or not r.payload:
                    stats["skipped"] += 1
                    continue
                by_arrival = round((r.time - base) * RATE)
                pos = start + _sdiff32(r.ts, anchor.ts)
                if abs(pos - by_arrival) > MAX_SKEW or pos < 0:
                    pos = by_arrival  # a timestamp jump: trust the clock
                pcm = dec(r.payload)
                if pos + len(r.payload) > MAX_SAMPLES:
                    stats["skipped"] += 1
                    continue
                chunks.append((pos, pcm))
                length = max(length, pos + len(r.payload))
                stats["decoded"] += 1
        placed.append(chunks)
    out = []
    for chunks in placed:
        buf = array.array("h", bytes(2 * length))
        for pos, pcm in chunks:
            seg = array.array("h")
            seg.frombytes(pcm)
            if sys.byteorder == "big":  # pragma: no cover
                seg.byteswap()
            buf[pos : pos + len(seg)] = seg
        out.append(buf)
    return out, stats


def _half(s: int) -> int:
    """C's (a + b) / 2: truncation towards zero."""
    return s >> 1 if s >= 0 else -((-s) >> 1)


def mix(a: array.array, b: array.array) -> array.array:
    return array.array("h", [_half(x + y) for x, y in zip(a, b)])


def interleave(a: array.array, b: array.array) -> array.array:
    out = array.array("h", bytes(4 * len(a)))
    out[0::2] = a
    out[1::2] = b
    return out


def write_wav(path: str, samples: array.array, nchannels: int) -> None:
    data = samples
    if sys.byteorder == "big":  # pragma: no cover
        data = array.array("h", samples)
        data.byteswap()
    with wave.open(path, "wb") as w:
        w.setnchannels(nchannels)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(data.tobytes())


def extract(
    out: str,
    *,
    a_path: str | None = None,
    b_path: str | None = None,
    single: str | None = None,
    stereo: bool = False,
    errfail: bool = False,
    err=None,
) -> int:
    """Write ``out``; returns the exit status (0, or 1 when nothing loaded)."""
    err = sys.stderr if err is None else err
    if single is not None:
        pkts = load_packets(single)
        chans = list(split_directions(pkts))
        loaded = 2
    else:
        chans = []
        loaded = 0
        for path in (a_path, b_path):
            pk: list = []
            if path is not None:
                try:
                    pk = load_packets(path)
                    loaded += 1
                except (OSError, recfmt.FormatError) as exc:
                    print(f"pyrtpproxy-extract: cannot load {path}: {exc}", file=err)
                    if errfail:
                        return 1
            chans.append(pk)
        if loaded == 0:
            print(f"pyrtpproxy-extract: cannot load neither {a_path} nor {b_path}", file=err)
            return 1
    (a, b), stats = render(chans)
    if stereo:
        write_wav(out, interleave(a, b), 2)
    else:
        both = bool(chans[0]) and bool(chans[1])
        write_wav(out, mix(a, b) if both else (a if chans[0] else b), 1)
    print(
        f"samples decoded: packets {stats['decoded']}, skipped {stats['skipped']}, written {len(a)}",
        file=err,
    )
    return 0


def scan(paths: Iterable[str], out=None) -> int:
    out = sys.stdout if out is None else out
    code = 0
    for path in paths:
        try:
            n = sum(1 for p in load_packets(path) if parse_rtp(p.data, p.time) is not None)
        except (OSError, recfmt.FormatError):
            n = -1
            code = 1
        print(f"{path}: {n}", file=out)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pyrtpproxy-extract",
        description="Decode an rtpproxy/pyrtpproxy recording (PCMU/PCMA) into a WAV file.",
    )
    ap.add_argument("-s", dest="stereo", action="store_true", help="two channels: A left, B right")
    ap.add_argument("-S", dest="scan", action="store_true", help="only count the packets of each file")
    ap.add_argument("-e", dest="errfail", action="store_true", help="fail if a file cannot be loaded")
    ap.add_argument("-A", dest="a_path", metavar="FILE", help="the answering party's recording")
    ap.add_argument("-B", dest="b_path", metavar="FILE", help="the originating party's recording")
    ap.add_argument("args", nargs="*", metavar="base|outfile")
    ns = ap.parse_args(argv)
    args = list(ns.args)
    explicit = ns.a_path is not None or ns.b_path is not None
    if ns.scan:
        if explicit:
            if args:
                ap.error("-S with -A/-B takes no other argument")
            return scan([p for p in (ns.a_path, ns.b_path) if p is not None])
        if len(args) != 1:
            ap.error("-S needs one recording base name")
        base = args[0]
        if os.path.isfile(base):
            return scan([base])
        return scan([base + ".a.rtp", base + ".o.rtp"])
    if explicit:
        if len(args) != 1:
            ap.error("give the output file")
        return extract(args[0], a_path=ns.a_path, b_path=ns.b_path, stereo=ns.stereo, errfail=ns.errfail)
    if len(args) != 2:
        ap.error("give a recording base name and the output file")
    base, out = args
    try:
        if os.path.isfile(base):
            return extract(out, single=base, stereo=ns.stereo)
        return extract(
            out, a_path=base + ".a.rtp", b_path=base + ".o.rtp", stereo=ns.stereo, errfail=ns.errfail
        )
    except (OSError, recfmt.FormatError) as exc:
        print(f"pyrtpproxy-extract: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
