"""The slow per-packet path, for the streams whose session asked for more
than relaying: RTP analysis (the rtpa_* counters), re-packetisation (``Z``)
and forking (``U ... && C``).

A stream whose ``Stream.hook`` is set sits in the media engine's second
stream table and is served by its slow loop (``MediaEngine._serve_slow``);
the fast loop tests nothing for it, so ordinary sessions pay nothing.  The
steps follow rtpproxy's packet-processor order: analyse, resize (a packet
the resizer takes leaves later, rebuilt), drop the media of a fork target's
own parties, copy to the fork targets and the recorder, relay.  Everything
here runs in the media thread; the control plane changes hooks only through
the jobs at the end of this module (queued with ``engine.call``).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from ..sessions.latch import UPDATE_WINDOW
from ..sessions.resizer import DISCARDED, Resizer
from ..sessions.rtpstats import UPDATE_SSRC_CHG, RtpAnalyzer

log = logging.getLogger("pyrtpproxy.media")

_QUIET_ERRNOS = frozenset(
    (
        errno.EAGAIN,
        errno.ENOBUFS,
        errno.ECONNREFUSED,
        errno.EPERM,
        errno.EINVAL,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EAFNOSUPPORT,
    )
)
_MAX_FORK_DEPTH = 4


class StreamHook:
    """What one stream does beyond relaying."""

    __slots__ = ("engine", "analyzer", "resizer", "forks", "drop_own")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.analyzer: RtpAnalyzer | None = None
        self.resizer: Resizer | None = None
        # Fork targets: for each, the target stream a copy is injected into
        # (it leaves through that stream's peer, towards its party).
        self.forks: list[Any] = []
        self.drop_own = 0  # a fork target: its parties' own media is dropped

    def empty(self) -> bool:
        return self.analyzer is None and self.resizer is None and not self.forks and not self.drop_own

    # ---- per packet --------------------------------------------------------
    def __call__(self, st: Any, mv: memoryview, n: int, src: Any, now: float) -> None:
        pkt = bytes(mv[:n])
        an = self.analyzer
        if an is not None and an.update(pkt, now) == UPDATE_SSRC_CHG:
            # rtpproxy re-records the latched SSRC when the analyser sees a
            # new one (outside the update window, symmetric streams only)
            if not st.asymmetric and now - st.last_update >= UPDATE_WINDOW:
                st.ssrc, st.seq = an.ssrc, an.seq
        rs = self.resizer
        if rs is not None:
            res = rs.enqueue(pkt, now)
            if res:
                eng = self.engine
                eng.npkts_resizer_in += 1
                if res == DISCARDED:
                    eng.npkts_resizer_discard += 1
                return
        self.deliver(st, pkt, src, now)

    def drain(self, st: Any, now: float) -> None:
        """After a socket's burst: send what the resizer has ready."""
        rs = self.resizer
        if rs is None:
            return
        while True:
            out = rs.get(now)
            if out is None:
                return
            if self.deliver(st, out, st.remote, now):
                self.engine.npkts_resizer_out += 1

    def deliver(self, st: Any, pkt: bytes, src: Any, now: float) -> bool:
        """Drop / fork / record / relay one packet received on ``st``."""
        if self.drop_own:
            st.ndropped += 1
            return False
        for tgt in self.forks:
            inject(tgt, pkt, now, 0)
        peer = st.peer
        if not record(self.engine, st, peer, pkt, src):
            return False
        return relay(self.engine, st, peer, pkt, True)


def record(engine: Any, st: Any, peer: Any, pkt: bytes, src: Any) -> bool:
    rec = st.rec
    if rec is not None and not peer.muted:
        try:
            rec(pkt, src, st)
        except Exception:
            engine.errors += 1
            st.rec = None
            log.exception("recorder failed; recording stopped")
    return True


def relay(engine: Any, st: Any, peer: Any, pkt: bytes, count: bool) -> bool:
    dst = peer.remote
    if dst is None or peer.muted or peer.sock is None:
        if count:
            st.ndropped += 1
        return False
    try:
        peer.sock.sendto(pkt, dst)
        if engine._dup_small and len(pkt) < 128 and not st.is_rtcp:
            peer.sock.sendto(pkt, dst)
    except OSError as exc:
        if exc.errno not in _QUIET_ERRNOS:
            engine.errors += 1
        if count:
            st.ndropped += 1
        return False
    if count:
        st.nrelayed += 1
        st.nbytes += len(pkt)
    return True


def inject(tgt: Any, pkt: bytes, now: float, depth: int) -> None:
    """A forked copy enters ``tgt`` as if received there, after the drop
    step; it is recorded and sent out of ``tgt``'s peer, uncounted."""
    if depth > _MAX_FORK_DEPTH:
        return
    hook = tgt.hook
    peer = tgt.peer
    if peer is None:
        return
    tgt.last_rx = now  # rtpproxy resets the target's TTL
    engine = hook.engine if hook is not None else None
    if hook is not None:
        for t2 in hook.forks:
            inject(t2, pkt, now, depth + 1)
    if engine is None:
        return
    record(engine, tgt, peer, pkt, tgt.remote)
    relay(engine, tgt, peer, pkt, False)


# ---- jobs (run in the media thread) ----------------------------------------------
def _hook(st: Any, engine: Any) -> StreamHook:
    h = st.hook
    if h is None:
        h = StreamHook(engine)
        st.hook = h
        engine.reclassify(st)  # from now on served by the slow loop
    return h


def _tidy(st: Any) -> None:
    h = st.hook
    if h is not None and h.empty():
        st.hook = None
        h.engine.reclassify(st)  # back to the fast loop


def enable_analysis(st: Any, engine: Any) -> None:
    h = _hook(st, engine)
    if h.analyzer is None:
        h.analyzer = RtpAnalyzer()


def set_resizer(st: Any, ptime: int | None, engine: Any) -> None:
    """``Z<ptime>`` on a U/L (None: no Z, the resizer goes with its queue)."""
    h = st.hook
    if ptime is None:
        if h is None or h.resizer is None:
            return
        engine.npkts_resizer_discard += len(h.resizer)
        h.resizer = None
        _tidy(st)
        return
    h = _hook(st, engine)
    if h.resizer is None:
        h.resizer = Resizer(ptime)
    else:
        h.resizer.set_ptime(ptime)


def add_fork(src: Any, tgt_in: Any, engine: Any) -> None:
    _hook(src, engine).forks.append(tgt_in)


def remove_forks(src: Any, tgt_in: Any) -> None:
    h = src.hook
    if h is None:
        return
    h.forks = [t for t in h.forks if t is not tgt_in]
    _tidy(src)


def set_drop_own(st: Any, engine: Any) -> None:
    _hook(st, engine).drop_own += 1


def drop_hook(st: Any, engine: Any) -> None:
    """The stream is going away: count what the resizer still held."""
    h = st.hook
    if h is None:
        return
    if h.resizer is not None:
        engine.npkts_resizer_discard += len(h.resizer)
    st.hook = None
    engine.reclassify(st)
