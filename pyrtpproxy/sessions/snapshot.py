"""Serialisable session snapshots and the state store's schema (pure).

A :class:`SessionSnap` holds what a restarted relay (or a standby that took
the media address over) needs to carry a call on: tags, the four streams'
local ports and interfaces, remotes and latch state, TTL deadlines, notify
target, codecs/ptime, recordings and the per-stream packet counters.

Times: the relay runs on a monotonic clock that means nothing to another
process, so snapshots store wall-clock times (``time.time()``); ``take`` and
``restore`` convert with an explicit ``(now_mono, now_wall)`` pair.

Encoding: one compact JSON object per session, ``{"v": SCHEMA, ...}``.
``decode`` migrates older schema versions it knows (``MIGRATIONS``) and
raises :class:`SchemaError` for anything else: a newer version, an unknown
old one, or bytes that are not a snapshot, so nothing is ever misread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import attrs

from ..protocol.inet import AF_INET, AF_INET6
from .session import Session, Stream

SCHEMA = 2  # the version this code writes
OLDEST = 1  # the oldest version it can migrate


class SchemaError(ValueError):
    """A stored snapshot this code must not use (corrupt, newer, unknown)."""


def _wall(t: float, now_mono: float, now_wall: float) -> float | None:
    if t <= -1e8 or not math.isfinite(t):  # "never" sentinels
        return None
    return round(t - now_mono + now_wall, 6)


def _mono(t: float | None, now_mono: float, now_wall: float) -> float:
    if t is None:
        return -1e9
    return t - now_wall + now_mono


@attrs.frozen
class IfaceSnap:
    family: int  # AF_INET / AF_INET6 (Linux values)
    addr: str | None
    adv: str | None = None
    label: str | None = None


@attrs.frozen
class StreamSnap:
    port: int = 0
    laddr: str | None = None
    family: int = 0
    shown: str | None = None
    pending: IfaceSnap | None = None  # interface chosen, not bound yet
    remote: tuple | None = None
    latched: bool = False
    untrusted: bool = False
    asymmetric: bool = False
    on_hold: bool = False
    last_update: float | None = None  # wall
    ssrc: int | None = None
    seq: int = 0
    nlatch: int = 0
    last_rx: float | None = None  # wall
    tos: int | None = None
    npkts_in: int = 0
    nrelayed: int = 0
    ndropped: int = 0
    nbytes: int = 0
    sdp: tuple | None = None  # endpoint learning: the address the last U/L gave
    learn_until: float | None = None  # wall; end of a learning window


@attrs.frozen
class RecSnap:
    """A local recording file fed by one stream (``key``: rtp0, rtcp1 ...)."""

    key: str
    name: str
    single: bool = False


@attrs.frozen
class SessionSnap:
    call_id: str
    tag: str
    created: float  # wall
    complete: bool
    strong: bool
    weak: tuple[bool, bool]
    codecs: tuple
    codecs_text: tuple
    ptime: tuple
    notify_socket: str | None
    notify_tag: str | None
    notify_host: str | None
    ttl_len: float
    reset_at: tuple[float, float]  # wall
    ttl_override: tuple
    rtp: tuple[StreamSnap, StreamSnap]
    rtcp: tuple[StreamSnap, StreamSnap]
    recs: tuple[RecSnap, ...] = ()

    @property
    def key(self) -> str:
        return session_key(self.call_id, self.tag)

    def deadline(self, independent: bool) -> float:
        """Wall time the session expires at (the session table's rule)."""
        ends = []
        for i in (0, 1):
            last = self.reset_at[i]
            for st in (self.rtp[i], self.rtcp[i]):
                if st.last_rx is not None:
                    last = max(last, st.last_rx)
            ln = self.ttl_override[i] if self.ttl_override[i] is not None else self.ttl_len
            ends.append((last, ln))
        if independent:
            return min(last + ln for last, ln in ends)
        return max(ends[0][0], ends[1][0]) + min(ends[0][1], ends[1][1])


def session_key(call_id: str, tag: str) -> str:
    """The store key of a session: Call-ID and creating tag, unambiguous."""
    return json.dumps([call_id, tag], ensure_ascii=False, separators=(",", ":"))


# ---- taking and restoring ------------------------------------------------------------


def _stream_snap(st: Stream, now_mono: float, now_wall: float) -> StreamSnap:
    pend = st.pending_iface
    pending = None
    if pend is not None and st.sock is None:
        pending = IfaceSnap(_fam(pend.family), pend.addr, pend.adv, pend.label)
    remote = tuple(st.remote) if st.remote is not None else None
    return StreamSnap(
        port=st.port if st.sock is not None else 0,
        laddr=st.laddr,
        family=_fam(st.family) if st.sock is not None else 0,
        shown=st.shown,
        pending=pending,
        remote=remote,
        latched=st.latched,
        untrusted=st.untrusted,
        asymmetric=st.asymmetric,
        on_hold=st.on_hold,
        last_update=_wall(st.last_update, now_mono, now_wall),
        ssrc=st.ssrc,
        seq=st.seq,
        nlatch=st.nlatch,
        last_rx=_wall(st.last_rx, now_mono, now_wall),
        tos=st.tos,
        npkts_in=st.npkts_in,
        nrelayed=st.nrelayed,
        ndropped=st.ndropped,
        nbytes=st.nbytes,
        sdp=tuple(st.sdp) if st.sdp is not None else None,
        learn_until=_wall(st.learn_until, now_mono, now_wall) if st.learn_until else None,
    )


def _fam(family: int) -> int:
    # socket.AF_* are these Linux numbers; keep them, 0 for "none yet"
    return family if family in (AF_INET, AF_INET6) else 0


def take(s: Session, now_mono: float, now_wall: float, recs: tuple[RecSnap, ...] = ()) -> SessionSnap:
    """A snapshot of ``s`` (read-only; the streams' live fields are read once)."""
    return SessionSnap(
        call_id=s.call_id,
        tag=s.tag,
        created=_wall(s.created, now_mono, now_wall) or now_wall,
        complete=s.complete,
        strong=s.strong,
        weak=(bool(s.weak[0]), bool(s.weak[1])),
        codecs=tuple(s.codecs),
        codecs_text=tuple(s.codecs_text),
        ptime=tuple(s.ptime),
        notify_socket=s.notify_socket,
        notify_tag=s.notify_tag,
        notify_host=s.notify_host,
        ttl_len=s.ttl_len,
        reset_at=(
            _wall(s.reset_at[0], now_mono, now_wall) or now_wall,
            _wall(s.reset_at[1], now_mono, now_wall) or now_wall,
        ),
        ttl_override=tuple(s.ttl_override),
        rtp=(
            _stream_snap(s.rtp[0], now_mono, now_wall),
            _stream_snap(s.rtp[1], now_mono, now_wall),
        ),
        rtcp=(
            _stream_snap(s.rtcp[0], now_mono, now_wall),
            _stream_snap(s.rtcp[1], now_mono, now_wall),
        ),
        recs=recs,
    )


def restore(
    snap: SessionSnap,
    now_mono: float,
    now_wall: float,
    make_iface: Callable[[IfaceSnap], Any] = lambda i: i,
) -> Session:
    """A Session (no sockets yet: ports and families set, ``sock`` None)
    carrying ``snap``'s state, its times converted to the monotonic clock."""
    s = Session.new(snap.call_id, snap.tag, _mono(snap.created, now_mono, now_wall), snap.ttl_len)
    s.complete = snap.complete
    s.strong = snap.strong
    s.weak = list(snap.weak)
    s.codecs = list(snap.codecs)
    s.codecs_text = list(snap.codecs_text)
    s.ptime = list(snap.ptime)
    s.notify_socket = snap.notify_socket
    s.notify_tag = snap.notify_tag
    s.notify_host = snap.notify_host
    s.reset_at = [_mono(t, now_mono, now_wall) for t in snap.reset_at]
    s.ttl_override = list(snap.ttl_override)
    for mine, theirs in ((s.rtp, snap.rtp), (s.rtcp, snap.rtcp)):
        for i in (0, 1):
            st, sn = mine[i], theirs[i]
            st.port = sn.port
            st.laddr = sn.laddr
            st.family = sn.family
            st.shown = sn.shown
            st.pending_iface = make_iface(sn.pending) if sn.pending is not None else None
            st.remote = tuple(sn.remote) if sn.remote is not None else None
            st.latched = sn.latched
            st.untrusted = sn.untrusted
            st.asymmetric = sn.asymmetric
            st.on_hold = sn.on_hold
            st.last_update = _mono(sn.last_update, now_mono, now_wall)
            st.ssrc = sn.ssrc
            st.seq = sn.seq
            st.nlatch = sn.nlatch
            st.last_rx = _mono(sn.last_rx, now_mono, now_wall)
            st.tos = sn.tos
            st.npkts_in = sn.npkts_in
            st.nrelayed = sn.nrelayed
            st.ndropped = sn.ndropped
            st.nbytes = sn.nbytes
            st.sdp = tuple(sn.sdp) if sn.sdp is not None else None
            st.learn_until = _mono(sn.learn_until, now_mono, now_wall) if sn.learn_until else 0.0
    return s


# ---- encoding ---------------------------------------------------------------------------


def _stream_dict(sn: StreamSnap) -> dict[str, Any]:
    d = attrs.asdict(sn, recurse=True)
    for k in ("remote", "sdp"):
        if d[k] is not None:
            d[k] = list(d[k][:2])
    return d


def encode(snap: SessionSnap) -> bytes:
    d = attrs.asdict(snap, recurse=False)
    d["rtp"] = [_stream_dict(x) for x in snap.rtp]
    d["rtcp"] = [_stream_dict(x) for x in snap.rtcp]
    d["recs"] = [attrs.asdict(r) for r in snap.recs]
    for k in ("weak", "codecs", "codecs_text", "ptime", "reset_at", "ttl_override"):
        d[k] = list(d[k])
    d["v"] = SCHEMA
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def _remote(v: Any) -> tuple | None:
    if v is None:
        return None
    host, port = v
    if not isinstance(host, str) or not isinstance(port, int):
        raise SchemaError("bad remote address")
    return (host, port, 0, 0) if ":" in host else (host, port)


def _stream_from(d: dict[str, Any]) -> StreamSnap:
    d = dict(d)
    if d.get("pending") is not None:
        d["pending"] = IfaceSnap(**d["pending"])
    d["remote"] = _remote(d.get("remote"))
    d["sdp"] = _remote(d.get("sdp"))
    return StreamSnap(**d)


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (the first draft) had one ``ttl`` deadline per session and no
    recordings or packet counters; schema 2 keeps both sides' TTL resets."""
    d = dict(d)
    d["v"] = 2
    d["reset_at"] = [d["reset"], d["reset"]]
    del d["reset"]
    d.setdefault("recs", [])
    return d


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_v1}


def decode(data: bytes | str) -> SessionSnap:
    """Bytes -> snapshot, migrating known older schemas; SchemaError otherwise."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"not a session snapshot: {exc}") from None
    if not isinstance(d, dict) or not isinstance(d.get("v"), int):
        raise SchemaError("not a session snapshot (no schema version)")
    v = d["v"]
    if v > SCHEMA:
        raise SchemaError(f"snapshot schema {v} is newer than this relay's ({SCHEMA})")
    while v < SCHEMA:
        mig = MIGRATIONS.get(v)
        if mig is None:
            raise SchemaError(f"snapshot schema {v} is too old (oldest understood: {OLDEST})")
        try:
            d = mig(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"snapshot schema {v} could not be migrated: {exc}") from None
        v = d["v"]
    try:
        del d["v"]
        d["rtp"] = tuple(_stream_from(x) for x in d["rtp"])
        d["rtcp"] = tuple(_stream_from(x) for x in d["rtcp"])
        d["recs"] = tuple(RecSnap(**r) for r in d.get("recs", ()))
        for k in ("weak", "codecs", "codecs_text", "ptime", "reset_at", "ttl_override"):
            d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in d[k])
        snap = SessionSnap(**d)
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"malformed session snapshot: {exc}") from None
    if len(snap.rtp) != 2 or len(snap.rtcp) != 2 or not isinstance(snap.call_id, str):
        raise SchemaError("malformed session snapshot: stream count")
    return snap
