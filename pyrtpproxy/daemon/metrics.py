"""Opt-in HTTP metrics listener (``--metrics tcp:HOST:PORT``).

``GET /metrics`` answers Prometheus text exposition (format 0.0.4) and
``GET /stats`` JSON, both rendered from one :class:`Snapshot` taken from the
same counter table ``G`` and ``I`` read (``Dispatcher.global_values()``),
plus gauges: active sessions and streams, ports in use / free per address
family, timeout notifications (queued, sent, dropped, pending), open
recordings and the draining flag.  ``HEAD`` is accepted too; anything else
gets 404 (unknown path) or 405 (other method).

The server is a deliberately tiny HTTP/1.0 responder: one request per
connection, request head limited to :data:`MAX_REQUEST` bytes and
:data:`REQUEST_TIMEOUT` seconds, at most :data:`MAX_CONNECTIONS` at once.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import time
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from ..sessions import stats as S
from .process import StartupError

log = logging.getLogger("pyrtpproxy")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
LINGER_TIMEOUT = 1.0  # after answering: seconds / bytes of input read away
LINGER_BYTES = 1 << 20
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = [
    "MetricsError",
    "MetricsServer",
    "Snapshot",
    "attach",
    "attach_metrics",
    "bind_metrics",
    "parse_metrics_url",
    "render_json",
    "render_prometheus",
    "snapshot",
]


class MetricsError(StartupError, ValueError):
    """Bad ``--metrics`` value or the listener could not be bound (the
    process reports it like any start-up failure: message, exit 1)."""


# ---- the numbers ------------------------------------------------------------------
@attrs.frozen
class Snapshot:
    counters: dict  # G name -> value (the G table)
    sessions_active: int
    streams_active: int
    ports: dict  # family label -> (in_use, free, size)
    notify: dict  # queued/sent/dropped/pending
    recordings_open: int
    draining: bool
    uptime: float
    sections: dict = attrs.Factory(dict)  # name -> JSON-able dict (e.g. "mediaproxy")


_FAMILY = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_RECORDING_COUNT_NAMES = ("nopen", "open_count", "recordings_open", "nrecordings_open")


def _recordings_open(rec: Any) -> int:
    if rec is None:
        return 0
    for name in _RECORDING_COUNT_NAMES:
        v = getattr(rec, name, None)
        if callable(v):
            try:
                v = v()
            except Exception:  # pragma: no cover
                continue
        if isinstance(v, int):
            return v
    channels = getattr(rec, "channels", None)  # recorder.Recorder: open files
    if channels is not None:
        try:
            return len(channels)
        except TypeError:
            pass
    return 0


def snapshot(server: Any, now: float | None = None) -> Snapshot:
    d = server.dispatcher
    counters = dict(d.global_values(now))
    ports = {}
    for fam, table in sorted(d.ports.items()):
        ports[_FAMILY.get(fam, str(fam))] = (len(table.in_use), table.free, table.size)
    n = getattr(server, "notifier", None)
    notify = {"queued": 0, "sent": 0, "dropped": 0, "pending": 0}
    if n is not None:
        notify.update({k: v for k, v in n.stats().items() if k in notify})
    started = getattr(server, "started_at", None)
    return Snapshot(
        counters=counters,
        sessions_active=len(d.table),
        streams_active=2 * len(d.table),
        ports=ports,
        notify=notify,
        recordings_open=_recordings_open(getattr(d, "recording", None)),
        draining=bool(d.draining),
        uptime=0.0 if started is None else max(0.0, time.monotonic() - started),
        sections={name: fn() for name, fn in getattr(server, "stats_sections", {}).items()},
    )


# ---- renderers ----------------------------------------------------------------------
def _prom_num(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _g_metric(name: str, kind: str) -> tuple[str, str]:
    """Prometheus name and type for a G counter."""
    if name == "total_duration":
        return "rtpproxy_sessions_duration_seconds_total", "counter"
    if kind == "double":
        return f"rtpproxy_{name}", "gauge"
    return f"rtpproxy_{name}_total", "counter"


def render_prometheus(snap: Snapshot) -> str:
    out: list[str] = []

    def metric(name: str, typ: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")
        for labels, v in samples:
            out.append(f"{name}{labels} {_prom_num(v)}")

    for gname, (kind, descr) in S.GLOBAL_COUNTERS.items():
        if gname not in snap.counters:
            continue
        pname, typ = _g_metric(gname, kind)
        metric(pname, typ, descr, [("", snap.counters[gname])])
    metric(
        "rtpproxy_sessions_active", "gauge", "Sessions currently in the table", [("", snap.sessions_active)]
    )
    metric(
        "rtpproxy_streams_active", "gauge", "RTP streams of the active sessions", [("", snap.streams_active)]
    )
    for key, idx, help_ in (
        ("rtpproxy_ports_in_use", 0, "Media port pairs in use"),
        ("rtpproxy_ports_free", 1, "Media port pairs free"),
        ("rtpproxy_ports_total", 2, "Media port pairs in the -m/-M range"),
    ):
        metric(key, "gauge", help_, [(f'{{family="{fam}"}}', v[idx]) for fam, v in snap.ports.items()])
    metric(
        "rtpproxy_notifications_queued_total",
        "counter",
        "Timeout notifications queued for delivery",
        [("", snap.notify["queued"])],
    )
    metric(
        "rtpproxy_notifications_sent_total",
        "counter",
        "Timeout notifications written to their target",
        [("", snap.notify["sent"])],
    )
    metric(
        "rtpproxy_notifications_dropped_total",
        "counter",
        "Timeout notifications dropped (queue full or target unreachable)",
        [("", snap.notify["dropped"])],
    )
    metric(
        "rtpproxy_notifications_pending",
        "gauge",
        "Timeout notifications waiting for delivery",
        [("", snap.notify["pending"])],
    )
    metric(
        "rtpproxy_recordings_open", "gauge", "Recording files currently open", [("", snap.recordings_open)]
    )
    metric("rtpproxy_draining", "gauge", "1 after SIGHUP (no new sessions)", [("", snap.draining)])
    metric("rtpproxy_uptime_seconds", "gauge", "Seconds since the relay started serving", [("", snap.uptime)])
    for section, values in snap.sections.items():
        for key, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metric(f"rtpproxy_{section}_{key}", "gauge", f"{section}: {key}", [("", v)])
    return "\n".join(out) + "\n"


def render_json(snap: Snapshot) -> str:
    def num(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    doc: dict[str, Any] = {name: num(v) for name, v in snap.counters.items()}
    doc.update(
        active_sessions=snap.sessions_active,
        active_streams=snap.streams_active,
        ports_in_use=sum(v[0] for v in snap.ports.values()),
        ports_free=sum(v[1] for v in snap.ports.values()),
        ports={fam: {"in_use": v[0], "free": v[1], "total": v[2]} for fam, v in snap.ports.items()},
        notify_queued=snap.notify["queued"],
        notify_sent=snap.notify["sent"],
        notify_dropped=snap.notify["dropped"],
        notify_pending=snap.notify["pending"],
        recordings_open=snap.recordings_open,
        draining=snap.draining,
        uptime=snap.uptime,
    )
    doc.update(snap.sections)
    return json.dumps(doc, sort_keys=False) + "\n"


# ---- the listener ----------------------------------------------------------------------
def parse_metrics_url(text: str) -> tuple[int, str | None, int]:
    """``tcp:HOST:PORT`` / ``tcp6:HOST:PORT`` -> (family, host or None, port).

    Host ``*`` means every address.  The port is required (0 = any).
    """
    from .control import parse_control_url

    try:
        spec = parse_control_url(text)
    except ValueError as exc:
        raise MetricsError(f"--metrics {text}: {exc}") from None
    if spec.kind not in ("tcp", "tcp6"):
        raise MetricsError(f"--metrics {text}: only tcp:HOST:PORT or tcp6:HOST:PORT is supported")
    port_s = text.rpartition(":")[2]
    if text.count(":") < 2 or not port_s.isdigit():
        raise MetricsError(f"--metrics {text}: a port is required (tcp:HOST:PORT)")
    fam = socket.AF_INET6 if spec.kind == "tcp6" else socket.AF_INET
    host = spec.host
    if host in ("*", "0.0.0.0", "::"):
        host = None
    return fam, host, spec.port


def bind_metrics(text: str) -> socket.socket:
    """Bind and listen (synchronously, before Trio runs and privileges drop)."""
    fam, host, port = parse_metrics_url(text)
    try:
        infos = socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MetricsError(f"--metrics {text}: can't resolve: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise MetricsError(f"--metrics {text}: can't bind: {exc.strerror}") from None
    addr = sock.getsockname()[0]
    if addr not in ("127.0.0.1", "::1") and not addr.startswith("127."):
        log.warning("metrics listener on %s is reachable from other hosts; it has no authentication", text)
    return sock


class MetricsServer:
    def __init__(self, server: Any, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.active = 0
        self.nrequests = 0

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lsock = trio.socket.from_stdlib_socket(self.sock)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn, _ = await lsock.accept()
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    if exc.errno in (errno.EBADF, errno.ENOTSOCK, errno.EINVAL):
                        return
                    log.error("metrics listener: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if self.active >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self.active += 1
                nursery.start_soon(self._conn, conn)

    async def _conn(self, conn: Any) -> None:
        stream = trio.SocketStream(conn)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                head = await _read_head(stream)
                status, ctype, body, head_only = self.respond(head)
                await stream.send_all(_response(status, ctype, body, head_only))
            if scope.cancelled_caught:
                return  # silent or slow client: just close
            # Close gently: send FIN, then read away what the client still
            # sends (bounded), so unread input doesn't turn into an RST that
            # destroys the answer (e.g. the 431 for a huge request).
            await stream.send_eof()
            with trio.move_on_after(LINGER_TIMEOUT):
                left = LINGER_BYTES
                while left > 0:
                    data = await stream.receive_some(min(left, 65536))
                    if not data:
                        break
                    left -= len(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("metrics connection: %s", exc)
        finally:
            conn.close()
            self.active -= 1

    def respond(self, head: bytes | None) -> tuple[str, str, bytes, bool]:
        """(status line, content type, body, HEAD?) for a request head."""
        if head is None:
            return "431 Request Header Fields Too Large", "text/plain", b"request too large\n", False
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/stats"):
            return "404 Not Found", "text/plain", b"not found\n", method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n", False
        self.nrequests += 1
        snap = snapshot(self.server)
        if path == b"/metrics":
            return "200 OK", PROM_CONTENT_TYPE, render_prometheus(snap).encode(), method == b"HEAD"
        return "200 OK", "application/json", render_json(snap).encode(), method == b"HEAD"


async def _read_head(stream: Any) -> bytes | None:
    """Bytes up to the blank line ending the head; None when over the limit."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) >= MAX_REQUEST:
            return None
        data = await stream.receive_some(MAX_REQUEST - len(buf))
        if not data:  # EOF: take what came (a bare "GET /metrics HTTP/1.0\n")
            return bytes(buf)
        buf += data


def _response(status: str, ctype: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


# ---- wiring ------------------------------------------------------------------------------
def attach_metrics(server: Any, url: str) -> MetricsServer:
    """Bind ``url`` now; serve it as one of ``server.services``.

    Raises :class:`MetricsError` (a ValueError) when the URL is bad or the
    address can't be bound.
    """
    m = MetricsServer(server, bind_metrics(url))
    if getattr(server, "started_at", None) is None:
        server.started_at = time.monotonic()
    server.services.append(m.run)
    server.closers.append(m.close)
    server.metrics = m
    return m


def attach(server: Any, cfg: Any) -> MetricsServer | None:
    url = getattr(cfg, "metrics", None)
    if not url:
        return None
    return attach_metrics(server, url)
