"""Per-stream RTP analysis: sequence tracking, loss, duplicates, jitter and
the longest inter-packet interval, computed the way rtpproxy computes them
(its rtp_analyze / rtpp_analyzer / pcnt_strm rules, including their
unsigned 32-bit arithmetic), as pure code.

One :class:`RtpAnalyzer` per RTP stream.  :meth:`RtpAnalyzer.update` takes
the packet bytes and the arrival time (the poll batch's monotonic time, as
rtpproxy uses); :meth:`stats` and :meth:`jitter` give what ``Q`` prints and
what ``G`` accumulates when the stream ends.  Nothing here does I/O.
"""

from __future__ import annotations

import struct

import attrs

M32 = 0xFFFFFFFF
PT_UNKN = 128

# Clock rate per static payload type (0: not a timed audio type).
TS_RATE: tuple[int, ...] = (
    8000,  # 0 PCMU
    0,  # 1 reserved
    0,  # 2 reserved
    8000,  # 3 GSM
    8000,  # 4 G723
    8000,  # 5 DVI4
    16000,  # 6 DVI4/16000
    8000,  # 7 LPC
    8000,  # 8 PCMA
    8000,  # 9 G722
    44100,  # 10 L16 mono
    44100,  # 11 L16 stereo
    8000,  # 12 QCELP
    8000,  # 13 CN
    90000,  # 14 MPA
    8000,  # 15 G728
    11025,  # 16 DVI4/11025
    22050,  # 17 DVI4/22050
    8000,  # 18 G729
) + (0,) * 109

PCMU, GSM, G723, PCMA, G722, G729 = 0, 3, 4, 8, 9, 18
NSAMPLES_UNKNOWN = -1

UPDATE_OK, UPDATE_SSRC_CHG, UPDATE_ERR = 0, 1, -1
_HDR = struct.Struct("!BBHII")
_NORMAL, _SEQ_RESET, _SSRC_RESET = 0, 1, 2
_JDATA_MAX = 10
_DEDUP_LEN = 10


def g723_len(ch: int) -> int:
    m = ch & 3
    if m == 2:
        return 4
    if m == 0:
        return 24
    if m == 1:
        return 20
    return NSAMPLES_UNKNOWN


def calc_samples(pt: int, payload: bytes | bytearray | memoryview) -> int:
    """Samples in a payload of a fixed-frame codec; -1 for any other type."""
    return _nsamples(pt, payload, 0, len(payload))


def _nsamples(pt: int, pkt: bytes | bytearray | memoryview, off: int, nbytes: int) -> int:
    if pt == PCMU or pt == PCMA or pt == G722:
        return nbytes
    if pt == G729:
        return (nbytes // 10) * 80 + (0 if nbytes % 10 == 0 else 80)
    if pt == GSM:
        return 160 * (nbytes // 33)
    if pt == G723:
        pos = samples = 0
        while pos < nbytes:
            samples += 240
            n = g723_len(pkt[off + pos])
            if n < 0:
                return NSAMPLES_UNKNOWN
            pos += n
        return samples
    return NSAMPLES_UNKNOWN


@attrs.define(slots=True)
class RtpInfo:
    """What rtpproxy's RTP parser extracts from one packet."""

    pt: int
    marker: bool
    seq: int
    ts: int
    ssrc: int
    data_offset: int
    data_size: int
    nsamples: int
    appendable: bool


def is_rtcp(pkt: bytes | bytearray | memoryview) -> bool:
    return len(pkt) >= 2 and (pkt[0] >> 6) == 2 and 200 <= pkt[1] <= 213


def parse_rtp(pkt: bytes | bytearray | memoryview) -> RtpInfo | None:
    """rtpproxy's rtp_packet_parse(): None when it would fail (perrs)."""
    size = len(pkt)
    if size < 12:
        return None  # too short (an RTCP-looking one fails as well)
    b0, b1, seq, ts, ssrc = _HDR.unpack_from(pkt)
    if b0 >> 6 != 2 or 200 <= b1 <= 213:
        return None  # not version 2, or RTCP on the RTP port
    off = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        if size < off + 4:
            return None
        off += 4 + 4 * ((pkt[off + 2] << 8) | pkt[off + 3])
    if size < off:
        return None
    pad = 0
    if b0 & 0x20:
        if off == size:
            return None
        pad = pkt[size - 1]
        if pad == 0:
            return None
    if size < off + pad:
        return None
    data_size = size - off - pad
    pt = b1 & 0x7F
    if data_size == 0:
        return RtpInfo(pt, bool(b1 & 0x80), seq, ts, ssrc, off, 0, NSAMPLES_UNKNOWN, True)
    return RtpInfo(
        pt,
        bool(b1 & 0x80),
        seq,
        ts,
        ssrc,
        off,
        data_size,
        _nsamples(pt, pkt, off, data_size),
        not (pt == G729 and data_size % 10 != 0),  # a trailing SID frame ends a packet
    )


class _JData:
    """Jitter state of one SSRC (rtp_analyze_jdata)."""

    __slots__ = (
        "ssrc",
        "inited",
        "prev_rtime_ts",
        "prev_ts",
        "ts_rcount",
        "ts_jcount",
        "ts_dcount",
        "seq_rcount",
        "jlast",
        "jmax",
        "jtotal",
        "pcount",
        "dedup",
        "dedup_pos",
        "dedup_full",
    )

    def __init__(self) -> None:
        self.ssrc = 0
        self.inited = False
        self.dedup = [0] * _DEDUP_LEN
        self.dedup_pos = 0
        self.dedup_full = False
        self.reset()

    def reset(self) -> None:
        self.prev_rtime_ts = 0
        self.prev_ts = 0
        self.ts_rcount = self.ts_jcount = self.ts_dcount = self.seq_rcount = 0
        self.jlast = self.jmax = self.jtotal = 0.0
        self.pcount = 0

    def seen_ts(self, ts: int) -> bool:
        last = _DEDUP_LEN if self.dedup_full else self.dedup_pos
        return ts in self.dedup[:last]

    def push_ts(self, ts: int) -> None:
        self.dedup[self.dedup_pos] = ts
        self.dedup_pos += 1
        if self.dedup_pos == _DEDUP_LEN:
            self.dedup_full = True
            self.dedup_pos = 0

    def update(self, ts: int, rate: int, audio: bool, rtime: float, hint: int) -> None:
        rtime_ts = int(rtime * rate)
        if audio and self.seen_ts(ts):
            self.ts_dcount += 1
            if self.pcount == 1:
                self.prev_rtime_ts = rtime_ts
                self.prev_ts = ts
            return
        count = True
        if self.prev_rtime_ts != 0:
            if hint == _SEQ_RESET:
                self.seq_rcount += 1
                count = False
            else:
                delta = abs(self.prev_rtime_ts - rtime_ts)
                prev_ts = self.prev_ts
                wrcorr = 0
                if prev_ts > ts:
                    if prev_ts - ts > 1 << 31:
                        wrcorr = 1 << 32
                    elif delta != 0 and prev_ts - ts > delta * 50:
                        self.ts_rcount += 1
                        count = False
                elif delta != 0 and ts - prev_ts > delta * 1024:
                    self.ts_jcount += 1
                    count = False
                if count:
                    dval = (rtime_ts - (ts + wrcorr)) - (self.prev_rtime_ts - prev_ts)
                    self.jlast = self.jlast + (abs(dval) - self.jlast) / 16.0
                    if self.jlast > self.jmax:
                        self.jmax = self.jlast
                    self.jtotal += self.jlast
        if count:
            self.pcount += 1
        if audio:
            self.push_ts(ts)
        self.prev_rtime_ts = rtime_ts
        self.prev_ts = ts


@attrs.frozen
class AnalyzerStats:
    """What Q reports for one stream (rtpa_* and longest_ipi)."""

    nsent: int = 0
    nrcvd: int = 0
    ndups: int = 0
    nlost: int = 0
    perrs: int = 0
    ssrc_changes: int = 0
    last_ssrc: int | None = None
    longest_ipi: float = 0.0
    jlast: float = 0.0
    jmax: float = 0.0
    javg: float = 0.0


class RtpAnalyzer:
    """Sequence and jitter tracking of one RTP stream."""

    def __init__(self) -> None:
        self.pecount = 0
        self.aecount = 0
        # rtpp_session_stat
        self.ssrc_changes = 0
        self.psent = 0
        self.precvd = 0
        self.duplicates = 0
        self.desync_count = 0
        self.seq_res_count = 0
        # rtpp_session_stat_last
        self.pcount = 0
        self.min_seq = 0
        self.max_seq = 0
        self.seq_offset = 0
        self.ssrc = 0
        self.seen = bytearray(131072 // 8)
        self.last_dups = 0
        self.seq = 0
        self.pt = PT_UNKN
        # jitter data, most recently used SSRC first
        self.jds: list[_JData] = [_JData()]
        self.jmax_acum = 0.0
        self.jtotal_acum = 0.0
        self.jvcount_acum = 0
        self.pcount_acum = 0
        # packet-counter side (rtpp_pcnt_strm)
        self.npkts = 0
        self.first_rcv = 0.0
        self.last_rcv = 0.0
        self.longest_ipi = 0.0

    # ---- per packet --------------------------------------------------------
    def update(self, pkt: bytes | bytearray | memoryview, rtime: float) -> int:
        """Account one accepted packet; UPDATE_SSRC_CHG when its SSRC changed."""
        self.npkts += 1
        if self.first_rcv == 0.0:
            self.first_rcv = rtime
        else:
            ipi = abs(rtime - self.last_rcv)
            if self.longest_ipi < ipi:
                self.longest_ipi = ipi
        if self.last_rcv < rtime:
            self.last_rcv = rtime
        info = parse_rtp(pkt)
        if info is None:
            self.pecount += 1
            return UPDATE_ERR
        rval = self._update(info, rtime)
        if rval == UPDATE_ERR:
            self.aecount += 1
        self.pt = info.pt
        return rval

    def _seen_set(self, pos: int) -> None:
        self.seen[pos >> 3] |= 1 << (pos & 7)

    def _totals_self(self) -> None:
        if self.pcount == 0:
            return
        self.psent = (self.psent + self.max_seq - self.min_seq + 1) & M32
        self.precvd = (self.precvd + self.pcount) & M32
        self.duplicates = (self.duplicates + self.last_dups) & M32

    def _restart(self, seq: int, rseq: int) -> None:
        self._totals_self()
        self.last_dups = 0
        self.seen = bytearray(131072 // 8)
        self.max_seq = self.min_seq = seq
        self.pcount = 1
        self._seen_set(seq % 131072)
        self.seq = rseq

    def _jdata(self, ssrc: int) -> _JData:
        jds = self.jds
        first = jds[0]
        if not first.inited:
            first.ssrc = ssrc
            first.inited = True
            return first
        for jd in jds:
            if jd.ssrc == ssrc:
                return jd
        if len(jds) == _JDATA_MAX:
            jd = jds.pop()
            jd.dedup_pos = 0
            jd.dedup_full = False
            if jd.pcount >= 2:
                if self.jmax_acum < jd.jmax:
                    self.jmax_acum = jd.jmax
                self.jtotal_acum += jd.jtotal
                self.jvcount_acum += jd.pcount - 1
                self.pcount_acum += jd.pcount
            jd.reset()
        else:
            jd = _JData()
            jd.inited = True
        jd.ssrc = ssrc
        jds.insert(0, jd)
        return jd

    def _update(self, info: RtpInfo, rtime: float) -> int:
        rseq = info.seq
        rate = TS_RATE[info.pt]
        audio = info.pt not in (1, 2)
        jd = self._jdata(info.ssrc)
        if self.ssrc_changes == 0:
            self.ssrc = info.ssrc
            self.max_seq = self.min_seq = rseq
            self.pcount = 1
            self.ssrc_changes = 1
            self._seen_set(rseq)
            self.seq = rseq
            if rate:
                jd.update(info.ts, rate, audio, rtime, _NORMAL)
            return UPDATE_OK
        if self.ssrc != info.ssrc:
            self._restart(rseq, rseq)
            self.ssrc = info.ssrc
            self.ssrc_changes += 1
            if rate:
                jd.update(info.ts, rate, audio, rtime, _SSRC_RESET)
            return UPDATE_SSRC_CHG
        seq = (rseq + self.seq_offset) & M32
        max_seq = self.max_seq
        if info.marker and seq < max_seq and (max_seq & 0xFFFF) != 65535:
            self._restart(seq, rseq)
            self.seq_res_count += 1
            if rate:
                jd.update(info.ts, rate, audio, rtime, _SEQ_RESET)
            return UPDATE_OK
        if rate:
            hint = _SEQ_RESET if seq == 0 and (max_seq & 0xFFFF) < 65500 else _NORMAL
            jd.update(info.ts, rate, audio, rtime, hint)
        if max_seq % 65536 < 536 and rseq > 65000:
            # a pre-wrap packet received after the wrap
            seq = (seq - 65536) & M32
        elif max_seq > 65000 and seq < max_seq - 65000:
            # the sequence wrapped
            self.seq_offset = (self.seq_offset + 65536) & M32
            seq = (seq + 65536) & M32
            if self.seq_offset % 131072 == 65536:
                self.seen[8192:] = bytes(8192)
            else:
                self.seen[:8192] = bytes(8192)
        elif ((seq + 536) & M32) < max_seq or seq > ((max_seq + 536) & M32):
            # desynchronisation: treated as an SSRC change
            self._restart(seq, rseq)
            self.desync_count += 1
            return UPDATE_OK
        pos = seq % 131072
        if self.seen[pos >> 3] & (1 << (pos & 7)):
            self.last_dups += 1
            self.seq = rseq
            return UPDATE_OK
        self._seen_set(pos)
        self.seq = rseq
        if seq >= max_seq:
            self.max_seq = seq
            self.pcount += 1
            return UPDATE_OK
        if seq >= self.min_seq:
            self.pcount += 1
            return UPDATE_OK
        if self.seq_offset == 0 and seq < self.min_seq:
            self.min_seq = seq
            self.pcount += 1
            return UPDATE_OK
        return UPDATE_ERR

    # ---- reading -----------------------------------------------------------
    def totals(self) -> tuple[int, int, int]:
        """(psent, precvd, duplicates) including the current run."""
        psent, precvd, dups = self.psent, self.precvd, self.duplicates
        if self.pcount:
            psent = (psent + self.max_seq - self.min_seq + 1) & M32
            precvd = (precvd + self.pcount) & M32
            dups = (dups + self.last_dups) & M32
        return psent, precvd, dups

    def jitter(self) -> tuple[float, float, float]:
        """(jlast, jmax, javg); zeros until some SSRC has two packets."""
        i = 0
        jlast = jmax = jtotal = 0.0
        jvcount = 0
        for jd in self.jds:
            if not jd.inited:
                break
            if jd.pcount < 2:
                continue
            if i == 0:
                jlast = jd.jlast
                jmax = max(self.jmax_acum, jd.jmax)
                jtotal = self.jtotal_acum + jd.jtotal
                jvcount = self.jvcount_acum + jd.pcount - 1
            else:
                if jmax < jd.jmax:
                    jmax = jd.jmax
                jtotal += jd.jtotal
                jvcount += jd.pcount - 1
            i += 1
        if i == 0:
            return 0.0, 0.0, 0.0
        return jlast, jmax, jtotal / jvcount

    def stats(self) -> AnalyzerStats:
        psent, precvd, dups = self.totals()
        jlast, jmax, javg = self.jitter()
        return AnalyzerStats(
            nsent=psent,
            nrcvd=precvd,
            ndups=dups,
            nlost=(psent - precvd) & M32,
            perrs=self.pecount,
            ssrc_changes=self.ssrc_changes,
            last_ssrc=self.ssrc if self.ssrc_changes else None,
            longest_ipi=self.longest_ipi,
            jlast=jlast,
            jmax=jmax,
            javg=javg,
        )
