"""RTP re-packetisation (the ``Z<ms>`` modifier), as pure code.

A :class:`Resizer` sits on one RTP stream.  Packets of the fixed-frame
codecs rtpproxy knows how to cut (G.711 u/A-law, G.722, G.723, G.729, GSM)
are queued in timestamp order; :meth:`Resizer.get` builds output packets of
the requested duration by joining consecutive payloads (same payload type,
contiguous timestamps) or splitting at frame boundaries, renumbers them
with the resizer's own sequence counter, and keeps the first packet's
header (SSRC, timestamp, marker).  The rules, including when output is due
(enough samples queued, or the oldest packet is two output periods old by
the stream's own clock), follow rtpproxy's rtp_resizer; like it, the clock
is taken as 8 kHz for every codec.  Nothing here does I/O: the caller gives
the packet bytes and the arrival time.
"""

from __future__ import annotations

from collections import deque

from .rtpstats import G722, G723, G729, GSM, PCMA, PCMU, g723_len, parse_rtp

M32 = 0xFFFFFFFF
MAX_PKT = 8192  # rtpproxy's packet buffer: output never grows past it

NOT_TAKEN, TAKEN, DISCARDED = 0, 1, 2


def ts_less(a: int, b: int) -> bool:
    return ((a - b) & M32) > (1 << 31)


def min_nsamples(pt: int) -> int:
    if pt == GSM:
        return 160  # 20 ms
    if pt == G723:
        return 240  # 30 ms
    return 80  # 10 ms


class _Pkt:
    """A queued packet: header, payload and padding kept apart."""

    __slots__ = ("hdr", "payload", "pad", "ts", "seq", "pt", "nsamples", "appendable")

    def __init__(
        self, hdr: bytearray, payload: bytearray, pad: bytes, ts: int, seq: int, pt: int, ns: int, app: bool
    ):
        self.hdr = hdr
        self.payload = payload
        self.pad = pad
        self.ts = ts
        self.seq = seq
        self.pt = pt
        self.nsamples = ns
        self.appendable = app

    @property
    def size(self) -> int:
        return len(self.hdr) + len(self.payload) + len(self.pad)

    def set_ts(self, ts: int) -> None:
        self.ts = ts & M32
        self.hdr[4:8] = self.ts.to_bytes(4, "big")

    def set_seq(self, seq: int) -> None:
        self.seq = seq & 0xFFFF
        self.hdr[2:4] = self.seq.to_bytes(2, "big")

    def to_bytes(self) -> bytes:
        return bytes(self.hdr) + bytes(self.payload) + self.pad


def _first_chunk(p: _Pkt, want: int) -> tuple[int, int] | None:
    """(bytes, samples) of the head of ``p`` holding at least ``want``
    samples; None when that is the whole packet (p.nsamples > want)."""
    pt = p.pt
    if pt in (PCMU, PCMA):
        return want, want
    if pt == G729:
        frames = want // 80 + (1 if want % 80 else 0)
        samples = frames * 80
        if samples >= p.nsamples:
            return None
        return frames * 10, samples
    if pt == GSM:
        frames = want // 160 + (1 if want % 160 else 0)
        samples = frames * 160
        if samples >= p.nsamples:
            return None
        return frames * 33, samples
    if pt == G723:
        frames = want // 240 + (1 if want % 240 else 0)
        samples = frames * 240
        if samples >= p.nsamples:
            return None
        pos = found = 0
        data = p.payload
        while pos < len(data) and samples > found:
            found += 240
            pos += g723_len(data[pos])
        return min(pos, len(data)), found
    if pt == G722:
        return want // 2, want
    return None


class Resizer:
    """rtpproxy's rtp_resizer for one stream."""

    def __init__(self, ptime_ms: int) -> None:
        self.nsamples_total = 0
        self.seq_initialized = False
        self.seq = 0
        self.ssrc: int | None = None
        self.last_sent_ts: int | None = None
        self.tsdelta: int | None = None
        self.output_nsamples = 0
        self.max_buf_nsamples = 0
        self.queue: deque[_Pkt] = deque()
        self.set_ptime(ptime_ms)

    def set_ptime(self, ptime_ms: int) -> None:
        self.output_nsamples = ptime_ms * 8
        self.max_buf_nsamples = max(self.output_nsamples * 2, 320)

    @property
    def ptime(self) -> int:
        return self.output_nsamples // 8

    def __len__(self) -> int:
        return len(self.queue)

    # ---- input --------------------------------------------------------------
    def enqueue(self, pkt: bytes | bytearray | memoryview, now: float) -> int:
        """Take a packet: NOT_TAKEN (relay it as it is), TAKEN, or
        DISCARDED (it came after later audio was already sent)."""
        info = parse_rtp(pkt)
        if info is None or info.nsamples < 0:
            return NOT_TAKEN
        ts = info.ts
        if self.ssrc is None:
            self.ssrc = info.ssrc
        elif self.ssrc != info.ssrc:
            # a new source: timestamps and sequence numbers start afresh
            self.ssrc = info.ssrc
            self.last_sent_ts = None
            self.tsdelta = None
        if self.last_sent_ts is not None and ts_less(ts, self.last_sent_ts):
            return DISCARDED
        internal_ts = int(now * 8000.0) & M32
        if self.tsdelta is None:
            self.tsdelta = (ts - internal_ts + 40) & M32
        else:
            ref_ts = (internal_ts + self.tsdelta) & M32
            if ts_less(ref_ts, ts):
                self.tsdelta = (ts - internal_ts + 40) & M32
            else:
                late = (ts + self.output_nsamples + 160) & M32
                if ts_less(late, ref_ts):
                    delta = ((ref_ts - late) & M32) // 2
                    self.tsdelta = (self.tsdelta - delta) & M32
        off = info.data_offset
        end = off + info.data_size
        p = _Pkt(
            bytearray(pkt[:off]),
            bytearray(pkt[off:end]),
            bytes(pkt[end:]),
            ts,
            info.seq,
            info.pt,
            info.nsamples,
            info.appendable,
        )
        q = self.queue
        i = len(q)
        while i > 0 and ts_less(ts, q[i - 1].ts):
            i -= 1
        q.insert(i, p)
        self.nsamples_total += info.nsamples
        return TAKEN

    # ---- output -------------------------------------------------------------
    def get(self, now: float) -> bytes | None:
        """The next output packet if one is due at ``now``."""
        q = self.queue
        if not q:
            return None
        assert self.tsdelta is not None
        ref_ts = int(now * 8000.0 + self.tsdelta) & M32
        if self.nsamples_total < self.output_nsamples and ts_less(
            ref_ts, (q[0].ts + self.max_buf_nsamples) & M32
        ):
            return None
        out = self.output_nsamples
        mn = min_nsamples(q[0].pt)
        if out < mn:
            out = mn
        elif out % mn:
            out += mn - out % mn
        ret: _Pkt | None = None
        while (ret is None or ret.nsamples < out) and q:
            p = q[0]
            if ret is None:
                if p.nsamples > out:
                    chunk = _first_chunk(p, out)
                    if chunk is None:
                        ret = p
                        q.popleft()
                    else:
                        nbytes, ns = chunk
                        ret = _Pkt(
                            bytearray(p.hdr), p.payload[:nbytes], b"", p.ts, p.seq, p.pt, ns, p.appendable
                        )
                        p.hdr[1] &= 0x7F  # the rest loses the marker
                        p.nsamples -= ns
                        p.set_ts(p.ts + ns)
                        del p.payload[:nbytes]
                    if not self.seq_initialized:
                        self.seq = ret.seq
                        self.seq_initialized = True
                    break
            else:
                if ((ret.ts + ret.nsamples) & M32) != p.ts or ret.pt != p.pt:
                    break  # a hole or another payload type
                left = out - ret.nsamples
                if 0 < left < p.nsamples:
                    chunk = _first_chunk(p, left)
                    if chunk is None:
                        if ret.size + len(p.payload) > MAX_PKT:
                            break
                        self._append(ret, p)
                        q.popleft()
                    else:
                        nbytes, ns = chunk
                        if ret.size + nbytes > MAX_PKT:
                            break
                        ret.payload += p.payload[:nbytes]
                        ret.nsamples += ns
                        p.nsamples -= ns
                        p.set_ts(p.ts + ns)
                        del p.payload[:nbytes]
                    break
            if ret is not None and ret.size + len(p.payload) > MAX_PKT:
                break
            q.popleft()
            if ret is None:
                ret = p
                if not self.seq_initialized:
                    self.seq = p.seq
                    self.seq_initialized = True
            else:
                self._append(ret, p)
            if not ret.appendable:
                break  # send a non-appendable packet at once
        if ret is None:
            return None
        self.nsamples_total -= ret.nsamples
        ret.set_seq(self.seq)
        self.seq = (self.seq + 1) & 0xFFFF
        self.last_sent_ts = (ret.ts + ret.nsamples) & M32
        return ret.to_bytes()

    @staticmethod
    def _append(dst: _Pkt, src: _Pkt) -> None:
        dst.payload += src.payload
        dst.nsamples += src.nsamples
        dst.appendable = src.appendable
