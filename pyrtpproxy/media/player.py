"""``P`` / ``S``: play rtpproxy prompt files to one party of a session.

A prompt file is what ``makeann`` writes: raw codec payload, no header,
named ``<base>.<payload type>``.  ``P`` picks the first codec of its list
whose file exists, then a player sends it as RTP out of the party's own
stream socket to the party's current remote address, on a deadline schedule
(packet *k* leaves at ``start + k * ptime``, so pacing never drifts).  While
a player runs, the stream is ``muted``: the media engine drops what it would
relay towards that party.

Layout:

* pure code: :func:`framing` (rtpproxy's packetisation per codec),
  :func:`parse_codecs`, :class:`Packetizer` (payload chunks -> RTP packets,
  with the loop count), :class:`PromptCache` (LRU bounded by bytes),
  :func:`resolve_prompt` / :func:`load_prompt` (blocking, run in a worker
  thread);
* Trio: :class:`Playback`, the object the dispatcher calls
  (``play`` / ``stop`` / ``session_gone``), with one task per player in its
  own nursery (a server service).
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import stat
import struct
import threading
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from ..protocol.ecodes import ECode, RtppError

log = logging.getLogger("pyrtpproxy.player")

# payload type -> (bytes per frame, ms per frame); rtpproxy's table.  PCMU,
# PCMA and G.722 are sample streams (8 bytes per ms), the others framed.
CODEC_FRAMES: dict[int, tuple[int, int]] = {
    0: (8, 1),  # PCMU
    8: (8, 1),  # PCMA
    9: (8, 1),  # G.722 (RTP clock 8000 by RFC 3551)
    18: (10, 10),  # G.729
    4: (24, 30),  # G.723
    3: (33, 20),  # GSM
}
DEFAULT_PTIME = 10  # ms, when no Z<ms> applies
TS_PER_MS = 8

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PROMPT_BYTES = 32 * 1024 * 1024  # ~70 min of G.711
MAX_LAG = 0.2  # s behind schedule before the schedule is moved on
WAIT_POLL = 0.01  # s, while the party's address is not known yet


@attrs.frozen
class Framing:
    chunk: int  # payload bytes per packet
    ms: int  # packet duration


def framing(pt: int, ptime: int | None) -> Framing | None:
    """rtpproxy's packetisation for ``pt`` (None: unsupported codec).

    The packet holds the fewest whole frames covering ``ptime`` ms.
    """
    fr = CODEC_FRAMES.get(pt)
    if fr is None:
        return None
    nbytes, ms = fr
    p = ptime if ptime is not None and ptime > 0 else DEFAULT_PTIME
    nframes = -(-p // ms)
    return Framing(chunk=nbytes * nframes, ms=ms * nframes)


def _strtol(text: str, i: int) -> tuple[int | None, int]:
    """C strtol(base 10) from ``text[i:]``: (value or None, end index)."""
    j = i
    n = len(text)
    while j < n and text[j] in " \t\n\v\f\r":
        j += 1
    k = j
    if k < n and text[k] in "+-":
        k += 1
    d = k
    while d < n and "0" <= text[d] <= "9":
        d += 1
    if d == k:
        return None, i
    return int(text[j:d]), d


def parse_codecs(text: str) -> list[int | None]:
    """The codec list of ``P``, item by item as rtpproxy walks it.

    Each item is a number; one separator character after it is skipped,
    whatever it is.  An item that is not a number ends the list with
    ``None``: the play fails there (E60) if no earlier file existed.
    """
    out: list[int | None] = []
    i = 0
    while i < len(text):
        v, end = _strtol(text, i)
        if v is None:
            out.append(None)
            break
        out.append(v)
        i = end + 1 if end < len(text) else end
    return out


_HDR = struct.Struct("!BBHII")


@attrs.define(eq=False)
class Packetizer:
    """Cuts a prompt into RTP packets (pure: no clock, no socket).

    Only whole chunks are sent: a short tail is skipped (rtpproxy reads
    fixed-size chunks and stops, or rewinds, at a short read).  ``loops``
    counts the replays left: 0 none, negative forever.
    """

    data: bytes
    pt: int
    fr: Framing
    loops: int
    ssrc: int = attrs.Factory(lambda: secrets.randbits(32))
    seq: int = attrs.Factory(lambda: secrets.randbits(16))
    ts: int = attrs.Factory(lambda: secrets.randbits(32) & 0xFFFFFFFE)
    marker: bool = True
    pos: int = 0

    @classmethod
    def for_count(cls, data: bytes, pt: int, fr: Framing, count: int, **kw: Any) -> Packetizer:
        return cls(data=data, pt=pt, fr=fr, loops=count - 1 if count > 0 else -1, **kw)

    def next(self) -> bytes | None:
        chunk = self.fr.chunk
        if self.pos + chunk > len(self.data):
            if self.loops == 0 or chunk > len(self.data):
                return None
            if self.loops > 0:
                self.loops -= 1
            self.pos = 0
        payload = self.data[self.pos : self.pos + chunk]
        self.pos += chunk
        b1 = (0x80 if self.marker else 0) | (self.pt & 0x7F)
        pkt = _HDR.pack(0x80, b1, self.seq, self.ts, self.ssrc) + payload
        self.marker = False
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + TS_PER_MS * self.fr.ms) & 0xFFFFFFFF
        return pkt


class PromptCache:
    """Prompt contents keyed by file identity, least recently used out first.

    The key is (device, inode, size, mtime): a file replaced or rewritten on
    disk is read again.  Thread-safe (filled from worker threads).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self.hits = 0
        self.misses = 0
        self._d: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.total -= len(old)
            self._d[key] = data
            self.total += len(data)
            while self.total > self.max_bytes:
                _, v = self._d.popitem(last=False)
                self.total -= len(v)


class PromptEscapes(Exception):
    """The prompt name leads outside the prompt directory."""


class PromptTooBig(Exception):
    pass


def resolve_prompt(name: str, base: str | None) -> str:
    """The path to open for file name ``name`` (``<prompt>.<pt>``).

    Without a base directory: the name as given (rtpproxy's behaviour).
    With one (already a real path): relative names are taken inside it,
    every symlink is resolved, and the result must still be inside it.
    Blocking (touches the file system).
    """
    if "\0" in name:
        raise PromptEscapes(name)
    if base is None:
        return name
    cand = name if os.path.isabs(name) else os.path.join(base, name)
    try:
        real = os.path.realpath(cand)
        inside = os.path.commonpath([real, base]) == base
    except (OSError, ValueError):
        raise PromptEscapes(name) from None
    if not inside or real == base:
        raise PromptEscapes(name)
    return real


def load_prompt(path: str, cache: PromptCache, max_bytes: int, nofollow: bool) -> bytes | None:
    """The file's contents, or None when it cannot be opened as a regular file.

    Blocking: run it in a worker thread.  A FIFO or device never blocks or
    streams forever: open is non-blocking and only regular files are read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if nofollow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > max_bytes:
            raise PromptTooBig(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        data = cache.get(key)
        if data is not None:
            return data
        parts = []
        left = st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            parts.append(b)
            left -= len(b)
        data = b"".join(parts)
        if len(data) == st.st_size:
            cache.put(key, data)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def find_prompt(
    prompt: str, codecs: Iterable[int | None], base: str | None, cache: PromptCache, max_bytes: int
) -> tuple[int, bytes] | str:
    """First (pt, contents) of the codec list, or a reason string (E60).

    Blocking: run it in a worker thread.
    """
    for pt in codecs:
        if pt is None:
            return "invalid codec list"
        name = f"{prompt}.{pt}"
        try:
            path = resolve_prompt(name, base)
        except PromptEscapes:
            return f"prompt {name!r} is outside the prompt directory"
        try:
            data = load_prompt(path, cache, max_bytes, nofollow=base is not None)
        except PromptTooBig:
            return f"prompt {name!r} is larger than {max_bytes} bytes"
        if data is not None:
            return pt, data
    return "no prompt file for any of the codecs"


# ---- Trio side ---------------------------------------------------------------------


@attrs.define(eq=False)
class Player:
    session: Any
    pidx: int
    stream: Any
    packets: Packetizer
    name: str
    cancel: trio.CancelScope = attrs.Factory(trio.CancelScope)
    finished: bool = False
    sent: int = 0
    late: int = 0  # times the schedule was moved on after a stall
    started_at: float | None = None


class Playback:
    """The dispatcher's ``playback`` hook."""

    def __init__(
        self,
        dispatcher: Any,
        *,
        prompt_dir: str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    ) -> None:
        self.dispatcher = dispatcher
        self.cache = PromptCache(cache_bytes)
        self.max_prompt_bytes = max_prompt_bytes
        self.base: str | None = None
        self.base_ok = True
        if prompt_dir is not None:
            self.base = os.path.realpath(prompt_dir)
            if not os.path.isdir(self.base):
                log.error("--prompt-dir %s is not a directory: every P will fail", prompt_dir)
                self.base_ok = False
        self._nursery: trio.Nursery | None = None
        self.players: set[Player] = set()

    # ---- service -------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for p in list(self.players):
                self._finish(p)

    # ---- dispatcher hooks -------------------------------------------------------
    async def play(self, cmd: Any, s: Any, pidx: int, now: float) -> str:
        self.stop(s, pidx)
        ptime = None
        if cmd.codecs == "session":
            if s.codecs[pidx] is None:
                raise RtppError(ECode.INVLARG_5)
            codecs: list[int | None] = list(s.codecs[pidx])
            ptime = s.ptime[pidx]
        else:
            codecs = parse_codecs(cmd.codecs)
        if cmd.count == 0:
            return "0"
        if not self.base_ok or self._nursery is None:
            raise RtppError(ECode.PLRFAIL)
        found = await trio.to_thread.run_sync(
            find_prompt, cmd.prompt, codecs, self.base, self.cache, self.max_prompt_bytes
        )
        if isinstance(found, str):
            log.info("can't play prompt %r: %s", cmd.prompt, found, extra={"callid": s.call_id})
            raise RtppError(ECode.PLRFAIL)
        pt, data = found
        fr = framing(pt, ptime)
        if fr is None:
            log.info(
                "can't play prompt %r: payload type %d is not supported",
                cmd.prompt,
                pt,
                extra={"callid": s.call_id},
            )
            raise RtppError(ECode.PLRFAIL)
        if s.deleted:  # went away (timeout) while the file was read
            raise RtppError(ECode.SESUNKN)
        self.stop(s, pidx)  # a P that raced with this one on the same party
        st = s.rtp[pidx]
        p = Player(
            session=s,
            pidx=pidx,
            stream=st,
            packets=Packetizer.for_count(data, pt, fr, cmd.count),
            name=f"{cmd.prompt}.{pt}",
        )
        s.players[pidx] = p
        self.players.add(p)
        st.muted = True
        self.dispatcher.counters.nplrs_created += 1
        log.info(
            "%d times playing prompt %s codec %d: SSRC=0x%08X, seq=%u",
            cmd.count,
            cmd.prompt,
            pt,
            p.packets.ssrc,
            p.packets.seq,
            extra={"callid": s.call_id},
        )
        self._nursery.start_soon(self._run, p)
        return "0"

    def stop(self, s: Any, pidx: int) -> None:
        p = s.players[pidx]
        if p is not None:
            self._finish(p)

    def session_gone(self, s: Any) -> None:
        for pidx in (0, 1):
            self.stop(s, pidx)

    # ---- players ---------------------------------------------------------------
    def _finish(self, p: Player) -> None:
        p.cancel.cancel()
        if p.finished:
            return
        p.finished = True
        self.players.discard(p)
        if p.session.players[p.pidx] is p:
            p.session.players[p.pidx] = None
            p.stream.muted = False
        self.dispatcher.counters.nplrs_destroyed += 1

    async def _run(self, p: Player) -> None:
        try:
            with p.cancel:
                await self._send_all(p)
        finally:
            self._finish(p)

    async def _send_all(self, p: Player) -> None:
        st = p.stream
        counters = self.dispatcher.counters
        if st.remote is None or st.sock is None:
            log.info(
                "prompt %s waits until the party's address is known",
                p.name,
                extra={"callid": p.session.call_id},
            )
            while st.remote is None or st.sock is None:
                await trio.sleep(WAIT_POLL)
        period = p.packets.fr.ms / 1000.0
        start = trio.current_time()
        p.started_at = start
        k = 0
        pk = p.packets
        while True:
            pkt = pk.next()
            if pkt is None:
                return
            deadline = start + k * period
            now = trio.current_time()
            if now < deadline:
                await trio.sleep_until(deadline)
                if p.finished or p.cancel.cancel_called:
                    return  # stopped (S, delete) while the wake-up was due
            elif now - deadline > MAX_LAG:
                # Stalled (e.g. the process was stopped): go on from now
                # rather than bursting everything that is overdue.
                start = now - k * period
                p.late += 1
            sock, dst = st.sock, st.remote
            if sock is not None and dst is not None:
                try:
                    sock.sendto(pkt, dst)
                    counters.npkts_played += 1
                    p.sent += 1
                except OSError:
                    pass
            k += 1


def attach(server: Any, cfg: Any) -> Playback:
    """Give ``server`` its P/S implementation (prompts from ``cfg.prompt_dir``)."""
    prompt_dir = getattr(cfg, "prompt_dir", None)
    pb = Playback(server.dispatcher, prompt_dir=prompt_dir)
    if prompt_dir is None:
        log.warning(
            "prompts are not confined: P opens any file this process can read; "
            "use --prompt-dir to restrict them to one directory"
        )
    server.dispatcher.playback = pb
    server.services.append(pb.run)
    return pb
