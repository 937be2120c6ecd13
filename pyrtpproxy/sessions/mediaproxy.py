"""MediaProxy's session semantics (spec mediaproxy.md section 6.2), as pure code.

A *call* is what MediaProxy calls a session: Call-ID plus the caller's tag,
found by ``(call_id, from_tag)`` or ``(call_id, to_tag)`` (so the callee's
re-INVITE and a use-mode BYE from the callee find it).  It holds, per CSeq
pair, the list of its media *streams*, one per listed ``m=`` line.

Whose SDP a message carries, and which ports go back:
``downstream = (from_tag != call.from_tag) XOR (type == request)``;
downstream means the caller's SDP, and the reply holds the ports that face
the callee; otherwise the callee's SDP and the caller-facing ports.  The CSeq
pair (caller's, callee's) orders the messages: a greater pair is an offer
(the stream list is built again, keeping a live stream of the same type
whose address is unchanged or only put on hold), an equal one the answer,
a smaller one is ignored.

The relaying itself is not here: every stream is backed by a relay stream
that a :class:`Backend` opens, updates and closes (the daemon backs each one
with an rtpproxy-style session of the shared session table, so latching,
timeouts, counters and ports are the rtpproxy side's).  In a relay stream,
index 1 is the socket pair whose remote is the party that opened the stream
(its *initiator*) and index 0 the other party's; a party sends to the port of
the socket that faces it.

Times are explicit ``now`` values (monotonic seconds); ``wall`` values are
epoch seconds, used only in statistics.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Protocol

import attrs

from ..protocol import mediaproxy as P

CALLER = "caller"
CALLEE = "callee"
ALIVE = frozenset({"active", "on hold"})
#: MediaProxy's on_hold_timeout: how long a stream on hold may stay silent.
ON_HOLD_TIMEOUT = 7200
#: How many CSeq pairs' stream lists a call keeps (older ones are all closed).
KEEP_CSEQS = 8
#: Expired calls remembered so that the module's later ``remove`` gets ``removed``.
EXPIRED_MEMORY = 4096
EXPIRED_KEEP = 86400.0


def other(party: str) -> str:
    return CALLEE if party == CALLER else CALLER


class BackendError(Exception):
    """The relay stream could not be opened (ports exhausted, draining...)."""


class Backend(Protocol):
    """What the state machine needs from the relay (the daemon implements it)."""

    def open(self, call: Call, stream: Stream, remote: tuple[str, int] | None, now: float) -> Any:
        """A relay stream with both port pairs; ``remote`` is the initiator's
        SDP address (None: on hold).  Returns its handle; raises BackendError."""
        ...

    def set_remote(self, handle: Any, index: int, remote: tuple[str, int] | None, now: float) -> None:
        """Party ``index``'s SDP address changed (None: on hold, ``0.0.0.0``)."""
        ...

    def set_hold(self, handle: Any, hold: bool, now: float) -> None:
        """The stream went on hold (longer timeout) or came back."""
        ...

    def local(self, handle: Any, index: int) -> tuple[str, int]:
        """(relay IP, port) of the socket that faces party ``index``."""
        ...

    def counters(self, handle: Any, index: int) -> tuple[int, int, Any]:
        """(packets, bytes, latched remote address or None) received from party ``index``."""
        ...

    def close(self, handle: Any, now: float) -> None:
        """Free the stream's ports now."""
        ...

    def relay_ip(self, call: Call) -> str:
        """The address written in replies when no stream gives one."""
        ...


@attrs.define(eq=False)
class Party:
    remote_sdp: tuple[str, int] | None = None
    on_hold: bool = False
    uses_ice: bool = False
    # final figures, kept when the relay stream is closed
    packets: int = 0
    bytes: int = 0
    remote: Any = None
    local: tuple[str, int] | None = None


@attrs.define(eq=False)
class Stream:
    media_type: str
    initiator: str
    created: float
    caller: Party = attrs.Factory(Party)
    callee: Party = attrs.Factory(Party)
    handle: Any = None
    status: str = "active"
    start_time: float | None = None
    end_time: float | None = None
    serial: int = 0

    @property
    def alive(self) -> bool:
        return self.status in ALIVE

    def party(self, name: str) -> Party:
        return self.caller if name == CALLER else self.callee

    def index(self, party: str) -> int:
        """The relay stream index whose remote is ``party``."""
        return 1 if party == self.initiator else 0

    @property
    def on_hold(self) -> bool:
        return self.caller.on_hold or self.callee.on_hold


@attrs.define(eq=False)
class Call:
    call_id: str
    from_tag: str
    from_uri: str
    to_uri: str
    created: float
    to_tag: str | None = None
    dialog_id: str | None = None
    caller_ua: str | None = None
    callee_ua: str | None = None
    username: str | None = None
    signaling_ip: str | None = None  # the caller's signaling address, if given
    cseq: tuple[int, int] | None = None
    previous_cseq: tuple[int, int] | None = None
    streams: dict = attrs.Factory(dict)  # (caller cseq, callee cseq) -> [Stream]
    start_time: float | None = None  # the first answer (monotonic)
    end_time: float | None = None
    nstreams: int = 0
    ended: str | None = None  # "removed" / "expired"

    def all_streams(self) -> list[Stream]:
        seen: dict[int, Stream] = {}
        for lst in self.streams.values():
            for s in lst:
                seen.setdefault(id(s), s)
        return sorted(seen.values(), key=lambda s: s.serial)

    def current_streams(self) -> Iterator[Stream]:
        for key in (self.previous_cseq, self.cseq):
            if key is not None:
                yield from self.streams.get(key, ())

    def duration(self, now: float) -> int:
        if self.start_time is None:
            return 0
        end = self.end_time if self.end_time is not None else now
        return int(max(0.0, end - self.start_time))


class Calls:
    """Every MediaProxy call, and what the module's requests do to them."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.calls: dict[tuple[str, str], Call] = {}
        self.expired: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.handles: dict[int, tuple[Call, Stream]] = {}  # id(handle) -> owner
        self.created = 0
        self.removed = 0
        self.timed_out = 0

    def __len__(self) -> int:
        return len(self.calls)

    # ---- lookup ------------------------------------------------------------
    def find(self, call_id: str, from_tag: str, to_tag: str | None) -> Call | None:
        c = self.calls.get((call_id, from_tag))
        if c is None and to_tag is not None:
            c = self.calls.get((call_id, to_tag))
        return c

    def owner(self, handle: Any) -> tuple[Call, Stream] | None:
        return self.handles.get(id(handle))

    # ---- update --------------------------------------------------------------
    def update(self, req: P.Update, now: float) -> bytes:
        """Run one ``update``; the reply line.  Raises MPError / BackendError."""
        call = self.find(req.call_id, req.from_tag, req.to_tag)
        media = req.media
        if call is not None:
            downstream = (call.from_tag != req.from_tag) ^ (req.type == "request")
            caller_cseq = call.from_tag == req.from_tag
            if call.dialog_id is None and req.dialog_id is not None:
                call.dialog_id = req.dialog_id
        elif req.type == "reply" and not media:
            return P.REPLY_NONE
        else:
            downstream = req.type == "request"
            caller_cseq = True
            call = Call(
                call_id=req.call_id,
                from_tag=req.from_tag,
                from_uri=req.from_uri,
                to_uri=req.to_uri,
                created=now,
                dialog_id=req.dialog_id,
                username=req.username,
                signaling_ip=P.plain_signaling_ip(req.signaling_ip),
            )
            self.calls[(req.call_id, req.from_tag)] = call
            self.expired.pop(req.call_id, None)
            self.created += 1
        try:
            self._update_media(call, req, downstream, caller_cseq, now)
        except BaseException:
            if call.cseq is None and not call.streams:
                self._forget(call)
            raise
        ports = self._local_media(call, downstream, req.cseq, caller_cseq)
        if not ports:
            return P.REPLY_NONE
        return P.format_update_reply(ports[0][0], [p for _, p in ports])

    def _update_media(
        self, call: Call, req: P.Update, downstream: bool, caller_cseq: bool, now: float
    ) -> None:
        old = call.cseq if call.cseq is not None else (0, 0)
        if caller_cseq:
            cseq = (req.cseq, old[1])
            if call.to_tag is None and req.to_tag is not None:
                call.to_tag = req.to_tag
        else:
            cseq = (old[0], req.cseq)
        party = CALLER if downstream else CALLEE
        if party == CALLER:
            if call.caller_ua is None:
                call.caller_ua = req.user_agent
        elif call.callee_ua is None:
            call.callee_ua = req.user_agent
        media = req.media
        if call.cseq is None or cseq > call.cseq:
            if not media:
                return
            self._offer(call, cseq, party, media, now)
        elif cseq == call.cseq:
            self._answer(call, cseq, party, media, req.to_tag, now)
        # else: an old CSeq, ignored (MediaProxy: "got old CSeq")

    def _offer(self, call: Call, cseq: tuple[int, int], party: str, media: tuple, now: float) -> None:
        old_streams = list(call.streams.get(call.cseq, ())) if call.cseq is not None else []
        new_streams: list[Stream] = []
        opened: list[Stream] = []
        try:
            for item in media:
                stream = None
                for old in old_streams:
                    prev = old.party(party).remote_sdp
                    old_ip, old_port = prev if prev is not None else (None, None)
                    if (
                        old.alive
                        and old.media_type == item.type
                        and (item.ip, item.port) in ((old_ip, old_port), ("0.0.0.0", old_port), (old_ip, 0))
                    ):
                        stream = old
                        old_streams.remove(old)
                        self._check_hold(stream, party, item, now)
                        break
                if stream is None:
                    stream = self._new_stream(call, party, item, now)
                    opened.append(stream)
                if item.port == 0:
                    self._close(stream, "closed", now)
                new_streams.append(stream)
        except BaseException:
            for s in opened:
                self._close(s, "closed", now)
            raise
        if call.previous_cseq is not None:
            keep = set(map(id, call.streams.get(call.cseq, ()))) | set(map(id, new_streams))
            for s in call.streams.get(call.previous_cseq, ()):
                if id(s) not in keep:
                    self._close(s, "closed", now)
        call.streams[cseq] = new_streams
        call.previous_cseq = call.cseq
        call.cseq = cseq
        while len(call.streams) > KEEP_CSEQS:
            oldest = min(call.streams)
            if oldest in (call.cseq, call.previous_cseq):  # pragma: no cover - cannot be the smallest
                break
            del call.streams[oldest]

    def _new_stream(self, call: Call, party: str, item: P.MediaItem, now: float) -> Stream:
        call.nstreams += 1
        stream = Stream(media_type=item.type, initiator=party, created=now, serial=call.nstreams)
        p = stream.party(party)
        p.remote_sdp = (item.ip, item.port)
        p.uses_ice = item.ice
        p.on_hold = item.on_hold
        if item.port == 0:
            return stream  # disabled at once: no ports taken
        remote = None if item.ip == "0.0.0.0" else (item.ip, item.port)
        stream.handle = self.backend.open(call, stream, remote, now)
        self.handles[id(stream.handle)] = (call, stream)
        if stream.on_hold:
            stream.status = "on hold"
            self.backend.set_hold(stream.handle, True, now)
        return stream

    def _check_hold(self, stream: Stream, party: str, item: P.MediaItem, now: float) -> None:
        before = stream.on_hold
        stream.party(party).on_hold = item.on_hold
        after = stream.on_hold
        if stream.alive:
            stream.status = "on hold" if after else "active"
            if before != after and stream.handle is not None:
                self.backend.set_hold(stream.handle, after, now)

    def _answer(
        self, call: Call, cseq: tuple[int, int], party: str, media: tuple, to_tag: str | None, now: float
    ) -> None:
        if call.start_time is None:
            call.start_time = now
        current = call.streams.get(cseq, [])
        for s in current:
            if s.start_time is None:
                s.start_time = now
        if to_tag is not None and not media:
            return
        for s in current[len(media) :]:
            self._close(s, "rejected", now)
        for s, item in zip(current, media):
            if s.media_type != item.type:
                raise P.MPError(f"media types do not match: {s.media_type!r} and {item.type!r}")
            if item.port == 0:
                self._close(s, "rejected", now)
                continue
            self._check_hold(s, party, item, now)
            p = s.party(party)
            p.uses_ice = item.ice
            if not s.alive:
                p.remote_sdp = (item.ip, item.port)
                continue
            if p.remote_sdp is None or p.remote_sdp[0] == "0.0.0.0":
                p.remote_sdp = (item.ip, item.port)
            elif p.remote_sdp[1] == item.port and (p.remote_sdp[0] == item.ip or item.ip == "0.0.0.0"):
                continue  # retained
            else:
                p.remote_sdp = (item.ip, item.port)
            remote = None if item.ip == "0.0.0.0" else (item.ip, item.port)
            self.backend.set_remote(s.handle, s.index(party), remote, now)
        if call.previous_cseq is not None:
            keep = set(map(id, current))
            for s in call.streams.get(call.previous_cseq, ()):
                if id(s) not in keep:
                    self._close(s, "closed", now)

    def _local_media(
        self, call: Call, downstream: bool, cseq: int, caller_cseq: bool
    ) -> list[tuple[str, int]] | None:
        pos = 0 if caller_cseq else 1
        keys = [k for k in call.streams if k[pos] == cseq]
        if not keys:
            return None
        facing = CALLEE if downstream else CALLER
        out = []
        ip = None
        for s in call.streams[max(keys)]:
            if s.alive and s.handle is not None:
                host, port = self.backend.local(s.handle, s.index(facing))
                ip = ip or host
                out.append((host, port))
            else:
                out.append(("", 0))
        if not out:
            return None
        ip = ip or self.backend.relay_ip(call)
        return [(ip, port) for _, port in out]

    # ---- end of streams and calls ----------------------------------------------
    def _snapshot(self, s: Stream) -> None:
        if s.handle is None:
            return
        for name in (CALLER, CALLEE):
            i = s.index(name)
            p = s.party(name)
            p.packets, p.bytes, p.remote = self.backend.counters(s.handle, i)
            p.local = self.backend.local(s.handle, i)

    def _close(self, s: Stream, status: str, now: float) -> None:
        if s.alive:
            s.status = status
        if s.end_time is None:
            s.end_time = now
        if s.handle is not None:
            h = s.handle
            self._snapshot(s)
            s.handle = None
            self.handles.pop(id(h), None)
            self.backend.close(h, now)

    def stream_gone(self, handle: Any, now: float, *, timeout: bool) -> Call | None:
        """The relay stream behind ``handle`` was destroyed by someone else
        (its timeout, a D command, shutdown).  Call with the relay stream's
        counters still readable.  Returns the call when this was a timeout
        and none of the call's streams is alive any more (MediaProxy's
        "session expired"): the caller does the accounting and ends the
        dialog; the call is dropped here.
        """
        owner = self.handles.pop(id(handle), None)
        if owner is None:
            return None
        call, s = owner
        self._snapshot(s)
        s.handle = None
        if s.end_time is None:
            s.end_time = now
        if s.alive:
            if not timeout:
                s.status = "closed"
            elif s.caller.uses_ice and s.callee.uses_ice and s.caller.packets + s.callee.packets == 0:
                s.status = "unselected ICE candidate"
            elif s.on_hold:
                s.status = "on hold timeout"
            elif s.caller.packets + s.callee.packets == 0:
                s.status = "no-traffic timeout"
            else:
                s.status = "conntrack timeout"
        if not timeout or call.ended is not None:
            return None
        if any(x.alive for x in call.current_streams()):
            return None
        self._end(call, "expired", now)
        self.timed_out += 1
        self.expired[call.call_id] = now
        while len(self.expired) > EXPIRED_MEMORY:
            self.expired.popitem(last=False)
        return call

    def remove(self, req: P.Remove, now: float) -> tuple[bytes, Call | None]:
        """Run one ``remove``: (reply, the call removed or None)."""
        call = self.find(req.call_id, req.from_tag, req.to_tag)
        if call is None:
            t = self.expired.pop(req.call_id, None)
            if t is not None and now - t <= EXPIRED_KEEP:
                return P.REPLY_REMOVED, None
            return P.REPLY_ERROR, None
        self._end(call, "removed", now)
        self.removed += 1
        return P.REPLY_REMOVED, call

    def _end(self, call: Call, how: str, now: float) -> None:
        call.ended = how
        call.end_time = now
        for s in call.all_streams():
            self._close(s, "closed", now)
        self._forget(call)

    def _forget(self, call: Call) -> None:
        if self.calls.get((call.call_id, call.from_tag)) is call:
            del self.calls[(call.call_id, call.from_tag)]

    def close_all(self, now: float) -> list[Call]:
        out = list(self.calls.values())
        for c in out:
            self._end(c, "removed", now)
        return out

    # ---- statistics (MediaProxy's JSON) ------------------------------------------
    def live_counters(self, s: Stream) -> None:
        """Refresh a live stream's figures from the relay."""
        self._snapshot(s)

    def statistics(self, call: Call, now: float, wall: float) -> dict:
        """The call's statistics, as MediaProxy's relay reports them (section 6.6)."""

        def epoch(t: float | None) -> float | None:
            return None if t is None else round(wall - (now - t), 3)

        streams = []
        for s in call.all_streams():
            if s.handle is not None:
                self._snapshot(s)
            base = call.start_time if call.start_time is not None else s.created
            streams.append(
                {
                    "media_type": s.media_type,
                    "status": s.status,
                    "timeout_wait": 0,
                    "caller_codec": "Unknown",
                    "callee_codec": "Unknown",
                    "start_time": 0 if s.start_time is None else int(max(0.0, s.start_time - base)),
                    "end_time": int(max(0.0, (s.end_time if s.end_time is not None else now) - base)),
                    "post_dial_delay": None,
                    "caller_bytes": s.caller.bytes,
                    "callee_bytes": s.callee.bytes,
                    "caller_packets": s.caller.packets,
                    "callee_packets": s.callee.packets,
                    "caller_local": _addr(s.caller.local),
                    "callee_local": _addr(s.callee.local),
                    "caller_remote": _addr(s.caller.remote or s.caller.remote_sdp),
                    "callee_remote": _addr(s.callee.remote or s.callee.remote_sdp),
                }
            )
        return {
            "call_id": call.call_id,
            "from_tag": call.from_tag,
            "from_uri": call.from_uri,
            "to_tag": call.to_tag,
            "to_uri": call.to_uri,
            "start_time": epoch(call.start_time),
            "duration": call.duration(now),
            "caller_ua": call.caller_ua or "Unknown",
            "callee_ua": call.callee_ua or "Unknown",
            "username": call.username,
            "dialog_id": call.dialog_id,
            "streams": streams,
        }

    def stream_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.calls.values():
            for s in c.current_streams():
                if s.alive:
                    out[s.media_type] = out.get(s.media_type, 0) + 1
        return out


def _addr(a: Any) -> str | None:
    if not a:
        return None
    return "%s:%d" % (a[0], a[1])


def totals(stats: dict) -> tuple[int, int]:
    """(packets, bytes) relayed in both directions, over a call's statistics."""
    p = b = 0
    for s in stats["streams"]:
        p += s["caller_packets"] + s["callee_packets"]
        b += s["caller_bytes"] + s["callee_bytes"]
    return p, b


def ice_only(stats: dict) -> bool:
    """Every stream ended as an unselected ICE candidate (no dialog end)."""
    st = stats["streams"]
    return bool(st) and all(s["status"] == "unselected ICE candidate" for s in st)
