"""``--mediaproxy unix:PATH``: serve OpenSIPS's ``mediaproxy`` module.

The module talks to MediaProxy's dispatcher over a unix stream socket (one
persistent connection per OpenSIPS process, one request at a time, one CRLF
reply line each).  Here pyrtpproxy plays dispatcher and relay at once:

* requests are parsed by :mod:`pyrtpproxy.protocol.mediaproxy` and run by
  the pure state machine :class:`pyrtpproxy.sessions.mediaproxy.Calls`;
* every media stream of a call is an rtpproxy session of the shared session
  table (:class:`Backend` below drives :meth:`Dispatcher.update` and
  :meth:`Dispatcher.destroy`), so ports, the media engine, latching, TTLs,
  recording and metrics are the rtpproxy side's; requests hold the
  dispatcher's lock like rtpproxy commands do;
* when every stream of a call has timed out, the call is accounted and, in
  engage mode (a ``dialog_id``), OpenSIPS is asked to end the dialog with
  an MI ``dlg_end_dlg`` datagram (``--mediaproxy-mi``), naming the dialog by
  the ID OpenSIPS 3.4 accepts (spec section 6.5).

Accounting (MediaProxy's statistics JSON) goes to the log at the end of
every call and into ``/stats`` (totals, live calls and the last ended ones).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import __version__
from ..protocol import commands as C
from ..protocol import mediaproxy as P
from ..protocol.ecodes import RtppError
from ..sessions import mediaproxy as M
from ..sessions.session import Session

log = logging.getLogger("pyrtpproxy.mediaproxy")

#: MediaProxy's and OpenSIPS's default dispatcher socket.
DEFAULT_SOCKET = "/run/mediaproxy/dispatcher.sock"
#: MediaProxy's default OpenSIPS MI socket ([OpenSIPS] socket_path).
DEFAULT_MI = "unix:/run/opensips/socket"
#: Open connections per socket (OpenSIPS opens one per process).
MAX_CONNECTIONS = 1024
#: Dialog-end requests waiting for the MI sender; more are dropped and counted.
MI_QUEUE = 256
#: Seconds to wait for OpenSIPS's answer to one MI request.
MI_TIMEOUT = 2.0
#: Ended calls kept for /stats.
RECENT = 50
#: Live calls listed in /stats (all of them are counted).
STATS_CALLS = 100


def parse_socket_arg(text: str) -> str:
    """``--mediaproxy`` argument -> socket path.  ``unix:PATH`` or a bare
    path; ``unix:`` alone (or an empty argument) means :data:`DEFAULT_SOCKET`."""
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        path = DEFAULT_SOCKET
    if "\0" in path:
        raise ValueError(f"--mediaproxy {text!r}: NUL character")
    if len(os.fsencode(path)) >= 108:
        raise ValueError(f"--mediaproxy {text!r}: socket name is too long (at most 107 bytes)")
    return path


def parse_mi_arg(text: str) -> tuple[str, Any] | None:
    """``--mediaproxy-mi``: ``unix:PATH`` (or a bare path), ``udp:HOST:PORT``,
    or ``none`` -> (kind, address) or None."""
    if text in ("none", "off", ""):
        return None
    if text.startswith("udp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--mediaproxy-mi {text!r}: expected udp:HOST:PORT")
        return "udp", (host, int(port))
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        raise ValueError(f"--mediaproxy-mi {text!r}: empty socket path")
    return "unix", path


# ---- the relay streams behind MediaProxy's streams --------------------------------
@attrs.define(eq=False)
class Relay:
    """A MediaProxy stream's rtpproxy session."""

    session: Session
    tag: str
    hold: bool = False


class Backend:
    """:class:`pyrtpproxy.sessions.mediaproxy.Backend` on the shared dispatcher."""

    def __init__(self, dispatcher: Any) -> None:
        self.d = dispatcher
        self.by_session: dict[Session, Relay] = {}

    def _mods(self, call: M.Call, remote: tuple[str, int] | None) -> C.ULMods:
        first = self.d.settings.ifaces[0]
        if first.shown is None and not self.d.settings.bridge:
            # A wildcard -l: bind on the address that routes towards the party
            # (MediaProxy's auto_detect_interfaces), so there is an IP to answer.
            towards = remote[0] if remote is not None else (call.signaling_ip or "127.0.0.1")
            return C.ULMods(remote_addr=towards)
        return C.ULMods()

    def _run(
        self, lookup: bool, call: M.Call, tag: str, remote: tuple[str, int] | None, now: float, mods: C.ULMods
    ) -> None:
        addr, port = remote if remote is not None else ("0.0.0.0", 0)
        cmd = C.Update(
            lookup=lookup,
            call_id=call.call_id,
            addr=addr,
            port=str(port),
            from_tag=tag,
            to_tag=None,
            mods=mods,
            remote=remote,
            on_hold=remote is None,
        )
        try:
            self.d.update(cmd, now, None)
        except RtppError as exc:
            raise M.BackendError(f"E{int(exc.code)}") from None

    def open(self, call: M.Call, stream: M.Stream, remote: tuple[str, int] | None, now: float) -> Relay:
        tag = f"{call.from_tag};mp{stream.serial}"
        mods = self._mods(call, remote)
        self._run(False, call, tag, remote, now, mods)
        found = self.d.table.find(call.call_id, tag, None)
        assert found is not None
        s = found[0]
        relay = Relay(s, tag)
        self.by_session[s] = relay
        try:
            # the other party's pair too, as MediaProxy does (4 ports a stream)
            self._run(True, call, tag, None, now, mods)
        except M.BackendError:
            self.close(relay, now)
            raise
        # until the answer gives the other party's address: the setup TTL (-W)
        s.reset_ttl(now, self.d.settings.setup_ttl)
        self.d.table.schedule(s)
        self.d.on_schedule()
        return relay

    def set_remote(self, handle: Relay, index: int, remote: tuple[str, int] | None, now: float) -> None:
        s = handle.session
        if s.deleted:
            return
        self.d.update(
            C.Update(
                lookup=index == 0,
                call_id=s.call_id,
                addr=remote[0] if remote else "0.0.0.0",
                port=str(remote[1]) if remote else "0",
                from_tag=handle.tag,
                to_tag=None,
                mods=C.ULMods(),
                remote=remote,
                on_hold=remote is None,
            ),
            now,
            None,
        )
        if handle.hold:
            self.set_hold(handle, True, now)

    def set_hold(self, handle: Relay, hold: bool, now: float) -> None:
        handle.hold = hold
        s = handle.session
        if s.deleted:
            return
        s.reset_ttl(now, M.ON_HOLD_TIMEOUT if hold else self.d.settings.ttl)
        self.d.table.schedule(s)
        self.d.on_schedule()

    def local(self, handle: Relay, index: int) -> tuple[str, int]:
        st = handle.session.rtp[index]
        return st.shown or st.laddr or self.relay_ip(None), st.port

    def counters(self, handle: Relay, index: int) -> tuple[int, int, Any]:
        s = handle.session
        self.d.engine.sync(s)
        rtp, rtcp = s.rtp[index], s.rtcp[index]
        remote = rtp.remote[:2] if rtp.remote is not None and rtp.npkts_in else None
        return rtp.nrelayed + rtcp.nrelayed, rtp.nbytes + rtcp.nbytes, remote

    def close(self, handle: Relay, now: float) -> None:
        self.by_session.pop(handle.session, None)
        if not handle.session.deleted:
            self.d.destroy(handle.session, now)

    def relay_ip(self, call: M.Call | None) -> str:
        first = self.d.settings.ifaces[0]
        if first.shown:
            return first.shown
        target = (call.signaling_ip if call is not None else None) or "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


# ---- the service -------------------------------------------------------------------
@attrs.define(eq=False)
class Totals:
    requests: int = 0
    errors: int = 0
    updates: int = 0
    removes: int = 0
    calls_ended: int = 0
    packets: int = 0
    bytes: int = 0
    duration: int = 0
    dialogs_ended: int = 0
    mi_failed: int = 0
    mi_dropped: int = 0
    connections: int = 0


class MediaProxyService:
    def __init__(
        self,
        server: Any,
        bound: list[Any],
        mi: tuple[str, Any] | None = None,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.d = server.dispatcher
        self.bound = bound
        self.mi = mi
        self.wall = wall
        self.backend = Backend(self.d)
        self.calls = M.Calls(self.backend)
        self.totals = Totals()
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.started = time.monotonic()
        self._mi_send: Any = None
        self._mi_ids = 0
        self._bps_sample = (time.monotonic(), 0)
        self.d.on_gone.append(self._on_gone)

    # ---- requests (run under the dispatcher's lock) -------------------------------
    def handle(self, lines: list[str], now: float) -> bytes:
        self.totals.requests += 1
        try:
            req = P.parse_request(lines)
        except P.MPError as exc:
            self.totals.errors += 1
            log.warning("mediaproxy: bad request: %s", exc)
            return P.REPLY_ERROR
        try:
            if isinstance(req, P.Update):
                self.totals.updates += 1
                return self._update(req, now)
            if isinstance(req, P.Remove):
                self.totals.removes += 1
                reply, call = self.calls.remove(req, now)
                if call is not None:
                    self._account(call, "removed", now)
                elif reply == P.REPLY_REMOVED:
                    log.info("mediaproxy: remove after the call expired", extra={"callid": req.call_id})
                else:
                    log.info(
                        "mediaproxy: remove of an unknown call (from_tag %s)",
                        req.from_tag,
                        extra={"callid": req.call_id},
                    )
                return reply
            return self._query(req.name, now)
        except (P.MPError, M.BackendError) as exc:
            self.totals.errors += 1
            log.warning("mediaproxy: request failed: %s", exc)
            return P.REPLY_ERROR
        except Exception:
            self.totals.errors += 1
            log.exception("mediaproxy: internal error")
            return P.REPLY_ERROR

    def _update(self, req: P.Update, now: float) -> bytes:
        if self.d.draining and self.calls.find(req.call_id, req.from_tag, req.to_tag) is None:
            log.info("mediaproxy: draining, new call refused", extra={"callid": req.call_id})
            return P.REPLY_ERROR
        reply = self.calls.update(req, now)
        log.debug(
            "mediaproxy: update %s cseq %d tags %s/%s media %s -> %s",
            req.type,
            req.cseq,
            req.from_tag,
            req.to_tag,
            ",".join(f"{m.type}:{m.ip}:{m.port}" for m in req.media) or "-",
            reply.decode().strip(),
            extra={"callid": req.call_id},
        )
        return reply

    def _query(self, name: str, now: float) -> bytes:
        if name == "version":
            doc: Any = __version__
        elif name == "sessions":
            wall = self.wall()
            doc = [self.calls.statistics(c, now, wall) for c in list(self.calls.calls.values())]
        else:
            doc = [self.summary(now)]
        return (json.dumps(doc) + "\r\n").encode()

    def summary(self, now: float) -> dict:
        return {
            "ip": self.backend.relay_ip(None),
            "version": __version__,
            "status": "halting" if self.d.draining else "active",
            "uptime": int(time.monotonic() - self.started),
            "session_count": len(self.calls),
            "stream_count": self.calls.stream_counts(),
            "bps_relayed": self._bps(),
        }

    def _bps(self) -> int:
        """Bits per second relayed since the previous summary."""
        total = self.totals.bytes
        for c in self.calls.calls.values():
            for s in c.all_streams():
                if s.handle is not None:
                    for i in (0, 1):
                        total += self.backend.counters(s.handle, i)[1]
        t0, b0 = self._bps_sample
        t = time.monotonic()
        self._bps_sample = (t, total)
        return int(max(0, total - b0) * 8 / (t - t0)) if t > t0 else 0

    # ---- end of calls ---------------------------------------------------------------
    def _on_gone(self, s: Session, now: float, timeout: bool) -> None:
        relay = self.backend.by_session.pop(s, None)
        if relay is None:
            return
        call = self.calls.stream_gone(relay, now, timeout=timeout)
        if call is not None:
            stats = self._account(call, "expired", now)
            ice = M.ice_only(stats)
            if call.dialog_id is not None and call.start_time is not None and not ice:
                self._end_dialog(call)
            elif ice:
                log.info(
                    "mediaproxy: call ended by ICE (unselected candidate)", extra={"callid": call.call_id}
                )

    def _account(self, call: M.Call, how: str, now: float) -> dict:
        stats = self.calls.statistics(call, now, self.wall())
        stats["timed_out"] = how == "expired"
        stats["all_streams_ice"] = M.ice_only(stats)
        packets, nbytes = M.totals(stats)
        t = self.totals
        t.calls_ended += 1
        t.packets += packets
        t.bytes += nbytes
        t.duration += stats["duration"]
        self.recent.append(stats)
        log.info(
            "mediaproxy: call %s, duration %d s, %d packets, %d bytes relayed: %s",
            how,
            stats["duration"],
            packets,
            nbytes,
            json.dumps(stats, separators=(",", ":")),
            extra={"callid": call.call_id},
        )
        return stats

    def _end_dialog(self, call: M.Call) -> None:
        ident = P.dialog_end_id(call.dialog_id, call.call_id)
        if self.mi is None or self._mi_send is None:
            log.warning(
                "mediaproxy: media timed out, but no OpenSIPS MI socket to end dialog %s",
                ident,
                extra={"callid": call.call_id},
            )
            return
        try:
            self._mi_send.send_nowait((call.call_id, ident))
        except trio.WouldBlock:
            self.totals.mi_dropped += 1
            log.error("mediaproxy: MI queue full, dialog %s not ended", ident, extra={"callid": call.call_id})

    # ---- I/O -----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[tuple[str, str]](MI_QUEUE)
        self._mi_send = send
        async with trio.open_nursery() as nursery:
            if self.mi is not None:
                nursery.start_soon(self._mi_sender, recv)
            for b in self.bound:
                await nursery.start(self._serve, b)
            task_status.started()

    async def _serve(
        self, bound: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        lsock = trio.socket.from_stdlib_socket(bound.sock)
        active = [0]
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn, _ = await lsock.accept()
                except OSError as e:
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    if e.errno in (errno.EBADF, errno.ENOTSOCK, errno.EINVAL):
                        return
                    log.error("mediaproxy: accept on %s: %s", bound.spec.path, e)
                    await trio.sleep(0.1)
                    continue
                if active[0] >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                active[0] += 1
                self.totals.connections += 1
                nursery.start_soon(self._conn, conn, active)

    async def _conn(self, conn: Any, active: list[int]) -> None:
        stream = trio.SocketStream(conn)
        framer = P.RequestFramer()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                try:
                    requests = framer.feed(data)
                except P.MPError as exc:
                    log.warning("mediaproxy: %s, closing the connection", exc)
                    return
                for lines in requests:
                    async with self.d.lock:
                        reply = self.handle(lines, self.d.clock())
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("mediaproxy connection: %s", e)
        finally:
            active[0] -= 1
            conn.close()

    async def _mi_sender(self, recv: Any) -> None:
        kind, addr = self.mi  # type: ignore[misc]
        async for call_id, ident in recv:
            self._mi_ids += 1
            req = {"jsonrpc": "2.0", "method": "dlg_end_dlg", "params": [ident], "id": self._mi_ids}
            data = json.dumps(req).encode()
            try:
                answer = await self._mi_request(kind, addr, data)
            except OSError as e:
                self.totals.mi_failed += 1
                log.error(
                    "mediaproxy: can't ask OpenSIPS (%s) to end dialog %s: %s",
                    addr,
                    ident,
                    e.strerror or e,
                    extra={"callid": call_id},
                )
                continue
            if answer is None:
                self.totals.dialogs_ended += 1
                log.info(
                    "mediaproxy: asked OpenSIPS to end dialog %s (no answer)",
                    ident,
                    extra={"callid": call_id},
                )
            elif b'"error"' in answer:
                self.totals.mi_failed += 1
                log.error(
                    "mediaproxy: OpenSIPS did not end dialog %s: %s",
                    ident,
                    answer.decode("utf-8", "replace").strip(),
                    extra={"callid": call_id},
                )
            else:
                self.totals.dialogs_ended += 1
                log.info("mediaproxy: OpenSIPS ended dialog %s", ident, extra={"callid": call_id})

    async def _mi_request(self, kind: str, addr: Any, data: bytes) -> bytes | None:
        if kind == "udp":
            fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            raw = socket.socket(fam, socket.SOCK_DGRAM)
        else:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                # an abstract address (bound at once, no thread), so that
                # OpenSIPS can answer
                raw.bind(f"\0pyrtpproxy-mi-{os.getpid()}-{self._mi_ids}")
            except BaseException:
                raw.close()
                raise
        raw.setblocking(False)
        with trio.socket.from_stdlib_socket(raw) as sock:
            await sock.sendto(data, addr)
            with trio.move_on_after(MI_TIMEOUT):
                return await sock.recv(65536)
        return None

    # ---- operators ---------------------------------------------------------------------
    def stats(self) -> dict:
        now = self.d.clock()
        wall = self.wall()
        t = attrs.asdict(self.totals)
        t.update(
            calls_active=len(self.calls),
            calls_created=self.calls.created,
            calls_removed=self.calls.removed,
            calls_timed_out=self.calls.timed_out,
            streams_active=sum(self.calls.stream_counts().values()),
            calls=[
                self.calls.statistics(c, now, wall) for c in list(self.calls.calls.values())[:STATS_CALLS]
            ],
            ended=list(self.recent),
        )
        return t

    def close(self) -> None:
        now = self.d.clock()
        for call in self.calls.close_all(now):
            self._account(call, "closed at shutdown", now)
        for b in self.bound:
            try:
                b.close()
            except Exception:  # pragma: no cover
                log.exception("closing a mediaproxy socket failed")


# ---- wiring ----------------------------------------------------------------------------
def bind_sockets(
    paths: list[str], *, sock_mode: int | None = None, owner: tuple[int, int] | None = None
) -> list:
    """Bind the dispatcher sockets (before Trio, while privileged)."""
    from .control import ControlSpec, bind_control

    bound: list = []
    try:
        for path in paths:
            parent = os.path.dirname(path)
            if parent and path == DEFAULT_SOCKET and not os.path.isdir(parent):
                os.makedirs(parent, mode=0o755, exist_ok=True)
            bound.append(
                bind_control(
                    ControlSpec(kind="cunix", path=path, text="mediaproxy:" + path),
                    sock_mode=sock_mode,
                    owner=owner,
                )
            )
    except BaseException:
        for b in bound:
            b.close()
        raise
    return bound


def attach(server: Any, cfg: Any) -> MediaProxyService | None:
    paths = list(getattr(cfg, "mediaproxy_sockets", ()) or ())
    if not paths:
        return None
    from . import process
    from .control import ControlBindError

    try:
        bound = bind_sockets(
            paths,
            sock_mode=process.control_socket_mode(cfg.run_as, cfg.sock_mode),
            owner=process.control_socket_owner(cfg.run_as),
        )
    except (OSError, ControlBindError) as exc:
        raise process.StartupError(f"--mediaproxy: {exc}") from None
    mi = parse_mi_arg(cfg.mediaproxy_mi) if cfg.mediaproxy_mi is not None else None
    return attach_service(server, bound, mi)


def attach_service(server: Any, bound: list, mi: tuple[str, Any] | None) -> MediaProxyService:
    svc = MediaProxyService(server, bound, mi)
    server.services.append(svc.run)
    server.closers.append(svc.close)
    server.__dict__.setdefault("stats_sections", {})["mediaproxy"] = svc.stats
    server.mediaproxy = svc
    return svc
