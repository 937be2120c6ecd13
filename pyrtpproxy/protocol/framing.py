"""Pure (sans-IO) framing helpers for the control sockets.

* :class:`LineFramer` cuts a byte stream into ``\\n``-terminated lines
  (cunix/tcp/tcp6/systemd/stdio control sockets).
* :func:`split_cookie` separates the cookie of a UDP control datagram from
  the command.
* :func:`strip_oneshot` tidies the single read of a ``unix:`` connection.
* :class:`ReplyCache` remembers UDP replies so that a retransmitted request
  is answered again without being run again.

Nothing here does I/O or reads a clock: callers pass bytes and ``now``.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Hashable

import attrs

__all__ = [
    "CMD_BUFLEN",
    "LineFramer",
    "ReplyCache",
    "RCACHE_TTL",
    "split_cookie",
    "strip_oneshot",
]

#: rtpproxy reads a command into an 8 KiB buffer (one byte is kept for the
#: terminating NUL), and a stream connection buffers at most 8 KiB.
CMD_BUFLEN = 8 * 1024

#: How long a UDP reply stays in the retransmission cache (rtpproxy: a minimum
#: TTL of 32 + 3 seconds).
RCACHE_TTL = 35.0

#: The four separators of the control protocol.
_WS = b" \t\r\n"
_WS_RE = re.compile(rb"[ \t\r\n]")


class LineFramer:
    """Split a byte stream into lines.

    ``feed(data)`` returns the lines completed by ``data``, in order, without
    their ``\\n`` and with one trailing ``\\r`` removed. Bytes are searched
    once: the partial line kept between calls never contains a ``\\n``, so
    only new data is scanned.

    ``max_line`` is the most bytes one line may take *counting its* ``\\n``
    (rtpproxy's stream buffer is 8 KiB, so a line of up to 8191 bytes plus its
    newline is accepted). A line that would be longer is reported as ``None``
    in its place in the returned list, as soon as it is known to be too long
    (its ``\\n`` need not have arrived), and the rest of it is discarded up to
    and including its ``\\n``; lines after it are delivered normally. At most
    ``max_line - 1`` bytes are ever buffered. ``overflows`` counts such lines.

    What to do about an over-long line is the caller's policy (rtpproxy
    closes the connection).
    """

    __slots__ = ("max_line", "overflows", "_buf", "_discarding")

    def __init__(self, max_line: int = CMD_BUFLEN) -> None:
        if max_line < 2:
            raise ValueError("max_line must be at least 2")
        self.max_line = max_line
        self.overflows = 0
        self._buf = bytearray()
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back (0 while discarding)."""
        return len(self._buf)

    @property
    def discarding(self) -> bool:
        """True while the tail of an over-long line is being thrown away."""
        return self._discarding

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        n = len(data)
        start = 0
        limit = self.max_line  # a line's content must be shorter than this
        buf = self._buf
        while start < n:
            nl = data.find(b"\n", start)
            if self._discarding:
                if nl < 0:
                    break
                self._discarding = False
                start = nl + 1
                continue
            if nl < 0:
                if len(buf) + (n - start) >= limit:
                    buf.clear()
                    self._discarding = True
                    self.overflows += 1
                    out.append(None)
                else:
                    buf += data[start:]
                break
            if len(buf) + (nl - start) >= limit:
                buf.clear()
                self.overflows += 1
                out.append(None)
            else:
                if buf:
                    buf += data[start:nl]
                    line = bytes(buf)
                    buf.clear()
                else:
                    line = data[start:nl]
                if line.endswith(b"\r"):
                    line = line[:-1]
                out.append(line)
            start = nl + 1
        return out


def split_cookie(datagram: bytes) -> tuple[bytes | None, bytes]:
    """Split a UDP control datagram into ``(cookie, command)``.

    The cookie is the first token (tokens are separated by runs of space, TAB,
    CR or LF); the command is the rest with its leading separators removed
    (``b""`` for a datagram that is only a cookie). ``cookie`` is ``None`` when
    the datagram holds no token at all, or when the first token contains a NUL
    byte: rtpproxy rejects that before it takes the cookie, so its ``E5`` goes
    back without one.
    """
    s = datagram.lstrip(_WS)
    if not s:
        return None, b""
    m = _WS_RE.search(s)
    if m is None:
        cookie, rest = s, b""
    else:
        cookie, rest = s[: m.start()], s[m.end() :].lstrip(_WS)
    if b"\0" in cookie:
        return None, b""
    return cookie, rest


def strip_oneshot(data: bytes) -> bytes:
    """Drop one trailing ``\\n`` or ``\\r\\n`` from a ``unix:`` request."""
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    return data


@attrs.define(eq=False)
class ReplyCache:
    """Recently sent UDP replies, for answering retransmissions.

    Keys are whatever the caller chooses (the UDP server uses the source
    address and the cookie). Every entry lives ``ttl`` seconds from ``put``.
    Because all entries share one TTL and ``now`` never goes backwards, the
    insertion order is the expiry order, so expiry pops from the front and
    never scans. At most ``max_entries`` entries and ``max_bytes`` bytes of
    replies are kept; past that the oldest are dropped early.
    """

    ttl: float = RCACHE_TTL
    max_entries: int = 65536
    max_bytes: int = 16 * 1024 * 1024
    _entries: collections.OrderedDict[Hashable, tuple[float, bytes]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _bytes: int = attrs.field(default=0, init=False)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, now: float) -> bytes | None:
        self.expire(now)
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, key: Hashable, reply: bytes, now: float) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._entries[key] = (now + self.ttl, reply)
        self._bytes += len(reply)
        self.expire(now)
        entries = self._entries
        while len(entries) > self.max_entries or (self._bytes > self.max_bytes and len(entries) > 1):
            _, (_, r) = entries.popitem(last=False)
            self._bytes -= len(r)

    def expire(self, now: float) -> int:
        """Drop entries whose time is up; return how many were dropped."""
        entries = self._entries
        dropped = 0
        while entries:
            key = next(iter(entries))
            expires, reply = entries[key]
            if expires > now:
                break
            del entries[key]
            self._bytes -= len(reply)
            dropped += 1
        return dropped
