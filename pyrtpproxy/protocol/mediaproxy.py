"""MediaProxy's dispatcher protocol, as OpenSIPS's ``mediaproxy`` module speaks it.

Pure: bytes in, parsed requests out; replies formatted as bytes.  Nothing
here does I/O.  The wire format (spec mediaproxy.md sections 2-4, 6.1, 6.7):

* a request is a command line (``update`` or ``remove``), then
  ``name: value`` lines, then one empty line; every line ends in CRLF
  (a bare LF is accepted too);
* a line whose value is empty (``to_tag: ``) counts as absent, as in
  MediaProxy's dispatcher;
* the reply is one line ending in CRLF: ``IP PORT...`` for an update,
  ``removed`` for a remove, ``error`` for anything that failed;
* the operator commands ``summary``, ``sessions`` and ``version`` (MediaProxy's
  management interface) are complete as soon as their line is: they need no
  empty line, and are answered with one JSON line.

Empty lines between requests are skipped.
"""

from __future__ import annotations

import attrs

__all__ = [
    "MAX_REQUEST",
    "MAX_STREAMS",
    "MPError",
    "MediaItem",
    "Query",
    "Remove",
    "RequestFramer",
    "Update",
    "format_update_reply",
    "parse_media",
    "parse_request",
    "REPLY_ERROR",
    "REPLY_NONE",
    "REPLY_REMOVED",
]

#: Bytes one request may take (OpenSIPS builds its requests in an 8 KiB
#: buffer plus the media list); a connection that sends more is closed.
MAX_REQUEST = 32 * 1024
#: OpenSIPS sends at most 32 streams (its limit on m= lines).
MAX_STREAMS = 32

REPLY_ERROR = b"error\r\n"
REPLY_REMOVED = b"removed\r\n"
#: What MediaProxy answers to an update that has no local media to give
#: (a reply that matches no session and carries no SDP).
REPLY_NONE = b"None\r\n"

QUERY_COMMANDS = frozenset({"summary", "sessions", "version"})
UPDATE_REQUIRED = ("call_id", "from_tag", "from_uri", "to_uri", "cseq", "user_agent", "type")
REMOVE_REQUIRED = ("call_id", "from_tag")
DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})


class MPError(Exception):
    """A request MediaProxy would answer ``error``; the text says why (logged)."""


@attrs.frozen
class MediaItem:
    """One item of the ``media`` field: ``type:ip:port:direction[:k=v...]``."""

    type: str
    ip: str
    port: int
    direction: str
    params: tuple[tuple[str, str], ...] = ()

    @property
    def ice(self) -> bool:
        return dict(self.params).get("ice", "no") == "yes"

    @property
    def on_hold(self) -> bool:
        """MediaProxy's hold forms: sendonly/inactive, or the address 0.0.0.0."""
        return self.direction in ("sendonly", "inactive") or self.ip == "0.0.0.0"


@attrs.frozen
class Update:
    type: str  # "request" or "reply"
    call_id: str
    cseq: int
    from_uri: str
    to_uri: str
    from_tag: str
    to_tag: str | None
    user_agent: str
    dialog_id: str | None = None
    signaling_ip: str | None = None
    media_relay: str | None = None
    media: tuple[MediaItem, ...] = ()
    username: str | None = None


@attrs.frozen
class Remove:
    call_id: str
    from_tag: str
    to_tag: str | None = None


@attrs.frozen
class Query:
    """``summary``, ``sessions`` or ``version``."""

    name: str


Request = Update | Remove | Query


class RequestFramer:
    """Cut a byte stream into requests (lists of decoded lines).

    ``feed(data)`` returns the requests completed by ``data``.  Raises
    :class:`MPError` once more than ``max_request`` bytes are held for one
    request (the caller closes the connection).  Bytes are scanned once.
    """

    __slots__ = ("max_request", "_buf", "_lines", "_held")

    def __init__(self, max_request: int = MAX_REQUEST) -> None:
        self.max_request = max_request
        self._buf = bytearray()
        self._lines: list[str] = []
        self._held = 0

    def feed(self, data: bytes) -> list[list[str]]:
        out: list[list[str]] = []
        buf = self._buf
        start = len(buf)
        buf += data
        pos = 0
        while True:
            nl = buf.find(b"\n", max(pos, start))
            if nl < 0:
                break
            raw = bytes(buf[pos:nl])
            self._held += nl + 1 - pos
            pos = nl + 1
            start = pos
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            line = raw.decode("utf-8", "surrogateescape")
            if not self._lines:
                if not line.strip():
                    self._held = 0
                    continue  # blank lines between requests
                if line.strip() in QUERY_COMMANDS:
                    out.append([line.strip()])
                    self._held = 0
                    continue
            if line == "":
                out.append(self._lines)
                self._lines = []
                self._held = 0
                continue
            self._lines.append(line)
            if self._held > self.max_request:
                raise MPError("request too long")
        del buf[:pos]
        if self._held + len(buf) > self.max_request:
            raise MPError("request too long")
        return out


def _positive_int(text: str, what: str, hi: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise MPError(f"bad {what} {text!r}")
    v = int(text)
    if v > hi:
        raise MPError(f"bad {what} {text!r}")
    return v


def parse_media(text: str) -> tuple[MediaItem, ...]:
    """The ``media`` field: comma-separated ``type:ip:port:direction:k=v`` items."""
    items = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) < 4:
            raise MPError(f"bad media item {part!r}")
        mtype, ip, port_s, direction = (f.strip() for f in fields[:4])
        if not mtype:
            raise MPError(f"bad media item {part!r}")
        port = _positive_int(port_s, "media port", 65535)
        try:
            octets = [int(o) for o in ip.split(".")]
        except ValueError:
            raise MPError(f"bad media address {ip!r}") from None
        if len(octets) != 4 or any(not 0 <= o <= 255 for o in octets):
            raise MPError(f"bad media address {ip!r}")
        params = []
        for kv in fields[4:]:
            k, eq, v = kv.partition("=")
            if not eq:
                raise MPError(f"bad media parameter {kv!r}")
            params.append((k.strip(), v.strip()))
        items.append(MediaItem(mtype, ip, port, direction or "sendrecv", tuple(params)))
    if len(items) > MAX_STREAMS:
        raise MPError(f"too many streams ({len(items)})")
    return tuple(items)


def plain_signaling_ip(text: str | None) -> str | None:
    """The IP in ``signaling_ip``: plain, ``SRC_DST`` or a JSON object."""
    if not text:
        return None
    if text.startswith("{"):
        import json

        try:
            doc = json.loads(text)
        except ValueError:
            return None
        v = doc.get("signaling_ip") if isinstance(doc, dict) else None
        return v if isinstance(v, str) else None
    return text.split("_", 1)[0].strip() or None


def _username(signaling_ip: str | None) -> str | None:
    """MediaProxy also takes a JSON object in ``signaling_ip`` (with ``username``)."""
    if not signaling_ip or not signaling_ip.startswith("{"):
        return None
    import json

    try:
        doc = json.loads(signaling_ip)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("username"), str):
        return str(doc["username"])
    return None


def parse_request(lines: list[str]) -> Request:
    """One request as the framer returned it.  Raises :class:`MPError`."""
    if not lines:
        raise MPError("empty request")
    command = lines[0].strip()
    if command in QUERY_COMMANDS:
        return Query(command)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line.endswith(": "):
            continue  # an empty value: MediaProxy drops the line
        name, sep, value = line.partition(": ")
        if not sep:
            # "name:" with nothing at all after the colon is empty too
            if line.endswith(":"):
                continue
            raise MPError(f"bad header line {line!r}")
        headers[name.strip()] = value
    if command == "update":
        missing = [h for h in UPDATE_REQUIRED if h not in headers]
        if missing:
            raise MPError("update without " + ", ".join(missing))
        mtype = headers["type"].strip()
        if mtype not in ("request", "reply"):
            raise MPError(f"bad type {mtype!r}")
        media_text = headers.get("media")
        media = parse_media(media_text) if media_text is not None and media_text.strip() else ()
        sig = headers.get("signaling_ip")
        return Update(
            type=mtype,
            call_id=headers["call_id"],
            cseq=_positive_int(headers["cseq"].strip(), "cseq", 0xFFFFFFFF),
            from_uri=headers["from_uri"],
            to_uri=headers["to_uri"],
            from_tag=headers["from_tag"],
            to_tag=headers.get("to_tag"),
            user_agent=headers["user_agent"],
            dialog_id=headers.get("dialog_id"),
            signaling_ip=sig,
            media_relay=headers.get("media_relay"),
            media=media,
            username=_username(sig),
        )
    if command == "remove":
        missing = [h for h in REMOVE_REQUIRED if h not in headers]
        if missing:
            raise MPError("remove without " + ", ".join(missing))
        return Remove(call_id=headers["call_id"], from_tag=headers["from_tag"], to_tag=headers.get("to_tag"))
    raise MPError(f"unknown command {command[:40]!r}")


def format_update_reply(ip: str, ports: list[int]) -> bytes:
    """``IP PORT...`` CRLF: the relay address, then one port per listed stream."""
    return (" ".join([ip, *(str(p) for p in ports)]) + "\r\n").encode("ascii")


def dialog_end_id(dialog_id: str | None, call_id: str) -> str:
    """The identifier OpenSIPS 3.4's ``dlg_end_dlg`` accepts (spec section 6.5).

    The module sends ``dialog_id`` as the decimal ``(h_entry << 32) | h_id``,
    which 3.4 does not take.  It takes the ``dlg_list`` ID: h_entry and h_id
    in hex, each written least-significant digit first, joined by ``.``
    (dialog_id 14955689039161 -> ``a9d.93558842``).  Without a usable
    dialog_id, the Call-ID (which 3.4 also accepts).
    """
    if dialog_id is not None and dialog_id.isascii() and dialog_id.isdigit():
        n = int(dialog_id)
        if 0 < n < 1 << 64:
            h_entry, h_id = n >> 32, n & 0xFFFFFFFF
            return ("%x" % h_entry)[::-1] + "." + ("%x" % h_id)[::-1]
    return call_id
