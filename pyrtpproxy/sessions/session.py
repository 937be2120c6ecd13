"""Sessions, streams and the session table (spec section 2), as pure code.

A session (Call-ID + the tag of the U that created it, ``;N`` included)
owns two RTP streams and two RTCP streams.  Stream 0 and stream 1 each own a
local socket; a packet arriving on stream *i* leaves through stream *1-i*
towards that stream's remote address.  U's address belongs to the party of
the command's first tag and is stored in stream 1; L's in stream 0.

Times are explicit ``now`` values from one monotonic clock; nothing here
touches a socket (streams carry their socket, but it is created, registered
and closed elsewhere).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import attrs


@attrs.define(eq=False, slots=True)
class Stream:
    """One direction's local socket and what the relay knows of its party."""

    session: Any
    index: int  # 0 or 1
    is_rtcp: bool
    sock: Any = None  # socket.socket once allocated
    fd: int = -1
    port: int = 0
    laddr: str | None = None  # local bind address (None: wildcard)
    family: int = 0
    shown: str | None = None  # address written in U/L replies (None: wildcard)
    pending_iface: Any = None  # interface chosen at creation, bound on first use
    # Where packets out of this socket go and where packets into it come from.
    remote: tuple | None = None
    latched: bool = False
    untrusted: bool = False  # remote learned from a packet
    asymmetric: bool = False
    on_hold: bool = False
    last_update: float = -1e9
    ssrc: int | None = None
    seq: int = 0
    nlatch: int = 0
    # Endpoint learning (latch.Policy, modes other than the default):
    sdp: tuple | None = None  # the address the last U/L gave (ranking reference)
    learn_until: float = 0.0  # end of the learning window (0: none running)
    cand: tuple | None = None  # best source seen in the window
    cand_rank: int = -1
    # Relay state, set by the control plane through the media engine.
    active: bool = False  # the session is complete: relay packets
    peer: Stream | None = None  # the other stream of the same pipe
    rtcp_twin: Stream | None = None  # for an RTP stream, its RTCP stream
    muted: bool = False  # a prompt plays towards this stream's party
    rec: Any = None  # recorder hook: rec(packet_bytes, src, stream)
    hook: Any = None  # the slow path (media.streamhook.StreamHook) or None
    # Counters (written by the media thread only).
    npkts_in: int = 0
    nrelayed: int = 0
    ndropped: int = 0
    nbytes: int = 0  # bytes relayed (MediaProxy accounting)
    last_rx: float = -1e9
    hot: bool = False  # the engine dropped a packet here lately: drain in bursts
    # Per-stream options.
    tos: int | None = None
    ttl: int | None = None
    # Where a media worker process serves it (sharding): id and counter slot.
    sid: int = -1
    slot: int = -1


def tag_matches_prefix(session_tag: str, tag: str) -> bool:
    """D/R/N matching: ``tag`` or ``tag;N``."""
    return session_tag == tag or (session_tag.startswith(tag) and session_tag[len(tag)] == ";")


def _medianum(tag: str) -> str | None:
    i = tag.rfind(";")
    return tag[i:] if i >= 0 else None


@attrs.define(eq=False)
class Session:
    call_id: str
    tag: str  # from-tag of the creating U, with any ;N
    created: float
    rtp: list = attrs.Factory(list)  # [Stream, Stream]
    rtcp: list = attrs.Factory(list)
    complete: bool = False
    strong: bool = False
    weak: list = attrs.Factory(lambda: [False, False])
    codecs: list = attrs.Factory(lambda: [None, None])  # per stream index
    codecs_text: list = attrs.Factory(lambda: [None, None])
    ptime: list = attrs.Factory(lambda: [None, None])
    notify_socket: str | None = None
    notify_tag: str | None = None
    notify_host: str | None = None  # controller's host for %%CC_SELF%%
    ttl_len: float = 60.0
    reset_at: list = attrs.Factory(lambda: [0.0, 0.0])
    ttl_override: list = attrs.Factory(lambda: [None, None])
    heap_deadline: float = math.inf
    players: list = attrs.Factory(lambda: [None, None])
    deleted: bool = False
    shard: int | None = None  # media worker process serving it (None: in-process)
    kernel_hold: int = 0  # >0: a command (R, C, P) keeps its packets in userspace
    analyzed: bool = False  # its RTP streams run the analyser (rtpa_* counters)
    # Forks into this session (U ... && C): (source stream, target stream).
    forks: list = attrs.Factory(list)

    @classmethod
    def new(cls, call_id: str, tag: str, now: float, ttl: float) -> Session:
        s = cls(call_id=call_id, tag=tag, created=now, ttl_len=ttl)
        s.reset_at = [now, now]
        for i in (0, 1):
            s.rtp.append(Stream(session=s, index=i, is_rtcp=False))
            s.rtcp.append(Stream(session=s, index=i, is_rtcp=True))
        for i in (0, 1):
            s.rtp[i].peer = s.rtp[1 - i]
            s.rtcp[i].peer = s.rtcp[1 - i]
            s.rtp[i].rtcp_twin = s.rtcp[i]
        return s

    def streams(self) -> Iterator[Stream]:
        yield from self.rtp
        yield from self.rtcp

    # ---- TTL ------------------------------------------------------------
    def reset_ttl(self, now: float, ttl: float | None = None) -> None:
        if ttl is not None:
            self.ttl_len = ttl
        self.reset_at[0] = self.reset_at[1] = now

    def _len(self, i: int) -> float:
        o = self.ttl_override[i]
        return self.ttl_len if o is None else o

    def expires_at(self, independent: bool) -> float:
        e = []
        for i in (0, 1):
            last = max(self.reset_at[i], self.rtp[i].last_rx, self.rtcp[i].last_rx)
            e.append((last, self._len(i)))
        if independent:
            return min(last + ln for last, ln in e)
        last = max(e[0][0], e[1][0])
        return last + min(e[0][1], e[1][1])

    def ttl_left(self, now: float, independent: bool) -> int:
        left = self.expires_at(independent) - now
        return max(0, math.ceil(left - 1e-9))


class SessionTable:
    """All sessions, indexed by Call-ID, and the expiry schedule."""

    def __init__(self, *, independent_ttl: bool = False) -> None:
        # Brings a session's packet counters and times up to date before its
        # expiry is judged (media worker processes publish them lazily).
        self.refresh: Callable[[Session], None] = lambda s: None
        self.by_callid: dict[str, list[Session]] = {}
        self.independent = independent_ttl
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Session]:
        for lst in self.by_callid.values():
            yield from lst

    # ---- matching ---------------------------------------------------------
    def find(self, call_id: str, from_tag: str, to_tag: str | None) -> tuple[Session, int] | None:
        """Exact match (U, L, P, S, C, Q): (session, 0) forward, (session, 1) reverse."""
        lst = self.by_callid.get(call_id)
        if not lst:
            return None
        for s in lst:
            if s.tag == from_tag:
                return s, 0
        if to_tag is not None:
            mn = _medianum(from_tag)
            for s in lst:
                if s.tag == to_tag or (mn is not None and s.tag == to_tag + mn):
                    return s, 1
        return None

    def find_prefix(self, call_id: str, from_tag: str, to_tag: str | None) -> list[tuple[Session, int]]:
        """Prefix match (D, R, N): every ``;N`` session of the call."""
        out = []
        for s in self.by_callid.get(call_id, ()):
            if tag_matches_prefix(s.tag, from_tag):
                out.append((s, 0))
            elif to_tag is not None and tag_matches_prefix(s.tag, to_tag):
                out.append((s, 1))
        return out

    # ---- membership -------------------------------------------------------
    def add(self, s: Session) -> None:
        self.by_callid.setdefault(s.call_id, []).append(s)
        self.count += 1
        self.schedule(s)

    def remove(self, s: Session) -> None:
        lst = self.by_callid.get(s.call_id)
        if lst is None or s not in lst:
            return
        lst.remove(s)
        if not lst:
            del self.by_callid[s.call_id]
        self.count -= 1
        s.deleted = True

    # ---- expiry -------------------------------------------------------------
    def schedule(self, s: Session) -> None:
        """(Re)compute ``s``'s deadline; the heap keeps the earliest entries."""
        d = s.expires_at(self.independent)
        if d < s.heap_deadline:
            s.heap_deadline = d
            heapq.heappush(self._heap, (d, next(self._seq), s))

    def next_deadline(self) -> float | None:
        h = self._heap
        while h and (h[0][2].deleted or h[0][0] != h[0][2].heap_deadline):
            heapq.heappop(h)
        return h[0][0] if h else None

    def expire(self, now: float) -> list[Session]:
        """Pop every session whose time is up; re-file the ones that moved on."""
        out = []
        h = self._heap
        while h and h[0][0] <= now:
            d, _, s = heapq.heappop(h)
            if s.deleted or d != s.heap_deadline:
                continue
            s.heap_deadline = math.inf
            self.refresh(s)
            real = s.expires_at(self.independent)
            if real <= now:
                out.append(s)
            else:
                s.heap_deadline = real
                heapq.heappush(h, (real, next(self._seq), s))
        return out
