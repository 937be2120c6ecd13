"""Runs parsed commands against the session table and the media engine.

This is the only module that touches several subsystems.  Every transport
calls :meth:`Dispatcher.handle` with one command's bytes (cookie already
removed) and gets the reply text back.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs

from ..media import streamhook as H
from ..media.engine import MediaEngine, bind_pair
from ..protocol import caps
from ..protocol import commands as C
from ..protocol.ecodes import ECode, RtppError
from ..sessions import stats as S
from ..sessions.ports import PortsExhausted, PortTable
from ..sessions.session import Session, SessionTable, Stream

log = logging.getLogger("pyrtpproxy")
_debug = functools.partial(log.isEnabledFor, logging.DEBUG)  # cached by logging

#: Commands that never wait (run by :meth:`Dispatcher.execute_now`).
_SYNC_COMMANDS = frozenset(
    (C.Update, C.Delete, C.Query, C.Version, C.VersionFeature, C.DeleteAll, C.Info, C.Stats)
)
#: First bytes of the commands that never wait: U, L, D, Q, V(F), X, I, G.
_NOW = frozenset(bytes([c]) for c in b"ULDQVXIGuldqvxig")


def _no_durability(cmd: Any) -> Any:
    """``on_answered`` without --state: a reply waits for nothing."""
    return None


@attrs.frozen
class Iface:
    """A local address media sockets bind to."""

    family: int  # socket.AF_INET / AF_INET6
    addr: str | None  # None: wildcard
    adv: str | None = None  # advertised in replies instead of addr
    label: str | None = None

    @property
    def shown(self) -> str | None:
        return self.adv or self.addr


@attrs.frozen
class Settings:
    """What the dispatcher needs from the configuration."""

    ifaces: tuple[Iface, ...] = (Iface(socket.AF_INET, None),)
    bridge: bool = False
    labelled: tuple[Iface, ...] = ()
    port_min: int = 35000
    port_max: int = 64998
    sequential: bool = False
    skip_ports: tuple[int, ...] = ()
    ttl: int = 60
    setup_ttl: int = 60
    independent_ttl: bool = False
    tos: int | None = 0xB8
    force_asymmetric: bool = False
    bridge_symmetric: bool = False
    notify_targets: tuple[str, ...] = ()
    endpoint_learning: str = "immediate"  # --endpoint-learning (sessions/latch.py)
    strict_source: bool = False  # --strict-source
    analyze: bool = False  # --analyze: every session runs the RTP analyser
    control_allow: tuple[str, ...] = ()  # --control-allow (daemon/control.py ControlAllow)

    def parse_env(self) -> C.ParseEnv:
        fams = {i.family for i in self.ifaces + self.labelled}
        return C.ParseEnv(
            bridge=self.bridge,
            has_ipv4=socket.AF_INET in fams,
            has_ipv6=socket.AF_INET6 in fams,
            labels=frozenset(i.label for i in self.labelled if i.label),
            notify=bool(self.notify_targets),
            service=udp_service,
        )


def udp_service(name: str) -> int | None:
    """A UDP service name's port from the system's services database, as
    getaddrinfo(3) finds it for rtpproxy (``sip`` -> 5060)."""
    try:
        return socket.getservbyname(name, "udp")
    except (OSError, UnicodeError, ValueError):
        return None


def _remote_tuple(remote: tuple[str, int] | None, port_delta: int = 0) -> tuple | None:
    if remote is None:
        return None
    host, port = remote
    port = (port + port_delta) & 0xFFFF
    if ":" in host:
        return (host, port, 0, 0)
    return (host, port)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        engine: MediaEngine,
        *,
        clock: Callable[[], float] = time.monotonic,
        parse: Callable[[bytes, C.ParseEnv], Any] | None = None,
    ) -> None:
        from ..protocol.parser import parse_command

        self.settings = settings
        self.engine = engine
        # The in-process engine: it runs the slow-path jobs (streamhook) of
        # the sessions that need them (those are never in a worker).
        self.local_engine = getattr(engine, "local", engine)
        self.clock = clock
        self._parse = parse or parse_command
        self.env = settings.parse_env()
        self.table = SessionTable(independent_ttl=settings.independent_ttl)
        self.table.refresh = engine.sync
        self.counters = S.Counters()
        self.ports: dict[int, PortTable] = {}
        for fam in {i.family for i in settings.ifaces + settings.labelled}:
            self.ports[fam] = PortTable(
                settings.port_min,
                settings.port_max,
                sequential=settings.sequential,
                skip=settings.skip_ports,
            )
        # rtpproxy's bind address list, newest first: the configured ones,
        # then every address an L<addr>/R<addr> modifier resolved to
        # ("learned"); U6/L6 without modifiers use the newest of the family.
        # (Configured ones are all kept, even two labels on one address.)
        self.bindaddrs: list[Iface] = list(reversed(settings.ifaces + settings.labelled))
        self.draining = False
        self.on_schedule: Callable[[], None] = lambda: None  # timer wake-up
        self.on_empty: Callable[[], None] = lambda: None  # drain finished
        self.on_timeout: Callable[[Session], None] = lambda s: None  # notify hook
        self.on_created: Callable[[Session], None] = lambda s: None  # -a hook
        # Called as fn(session, now, timed_out) when a session is destroyed,
        # before its sockets close (its counters are still readable).
        self.on_gone: list[Callable[[Session, float, bool], None]] = []
        # --state: called once per answered command; may return an async
        # function the reply waits for (the change is durable).
        self.on_answered: Callable[[Any], Any] = _no_durability
        self.defers_replies = False  # --state: UDP replies wait in tasks of their own
        self._durable: Any = None
        self._pps_sample = (clock(), 0)
        self._lock: Any = None  # a trio.Lock, made on first use inside Trio
        # Hooks the recording/playback issues fill in.
        self.recording = None
        self.playback = None
        # --kernel: media.kernel.KernelPath (None: everything in userspace).
        self.kernel: Any = None

    # ---- transport interface ---------------------------------------------
    def note_received(self) -> None:
        self.counters.ncmds_rcvd += 1

    def note_duplicate(self) -> None:
        self.counters.ncmds_rcvd_ndups += 1

    def _learn(self, iface: Iface) -> Iface:
        """The newest bind address with ``iface``'s address (labelled or not,
        as rtpproxy's addr2bindaddr), else ``iface``, added to the list."""
        want = _ip_of(iface)
        for i in self.bindaddrs:
            if i.family == iface.family and _ip_of(i) == want:
                return i
        self.bindaddrs.insert(0, iface)
        env = getattr(self, "env", None)
        if env is not None:
            if iface.family == socket.AF_INET6 and not env.has_ipv6:
                self.env = attrs.evolve(env, has_ipv6=True)
            elif iface.family == socket.AF_INET and not env.has_ipv4:
                self.env = attrs.evolve(env, has_ipv4=True)
        return iface

    @property
    def lock(self) -> Any:
        """The lock every command holds (rtpproxy's global lock): other
        control protocols (MediaProxy's) take it too."""
        if self._lock is None:
            import trio

            self._lock = trio.Lock()
        return self._lock

    async def handle(self, data: bytes, peer_host: str | None = None) -> bytes:
        """Run one command; commands never interleave (rtpproxy's global lock)."""
        out, wait = await self.handle_deferred(data, peer_host)
        if wait is not None:
            await wait()  # --state: the reply leaves once its change is durable
        return out

    async def handle_deferred(self, data: bytes, peer_host: str | None = None) -> tuple[bytes, Any]:
        """Run one command; returns (reply, None) or, with --state, (reply,
        an async function to await before the reply is sent)."""
        async with self.lock:
            out = await self._handle(data, peer_host)
            wait, self._durable = self._durable, None
        return out, wait

    def handle_now(self, data: bytes, peer_host: str | None = None) -> bytes | None:
        """Run a command that never waits (U, L, D, Q, V, I, G, X) here and now.

        Returns the reply, or None when the command has to go through
        :meth:`handle` (a command that waits: R, C, P, S, N, a U/L or Q that
        first moves its session into this process, see :meth:`_waits`;
        another command is still running; or --state, where a reply waits
        for its change to be durable).  The transports try this first: it
        spares a Trio task switch and a lock per command.  It never yields,
        so it cannot interleave with another command.
        """
        if (
            data[:1] not in _NOW
            or self.on_answered is not _no_durability
            or (self._lock is not None and self._lock.locked())
        ):
            return None
        return self._run(data, peer_host)

    async def _handle(self, data: bytes, peer_host: str | None) -> bytes:
        if data[:1] in _NOW:
            done = self._run(data, peer_host)
            if done is not None:
                return done
        elif _debug():
            log.debug('received command "%s"', data.decode("utf-8", "replace").rstrip("\r\n"))
        try:
            cmd = self._parse(data, self.env)
            try:
                reply = await self.execute(cmd, peer_host)
            finally:
                self._durable = self.on_answered(cmd)
        except _ErrorReply as exc:
            return self._failed(exc, exc.text)
        except RtppError as exc:
            return self._failed(exc)
        except Exception:
            return self._crashed()
        return self._done(reply)

    def _run(self, data: bytes, peer_host: str | None) -> bytes | None:
        """Parse and run a command that never waits; None if this one has to."""
        if _debug():
            log.debug('received command "%s"', data.decode("utf-8", "replace").rstrip("\r\n"))
        try:
            cmd = self._parse(data, self.env)
            if self._waits(cmd):
                return None
            try:
                reply = self.execute_now(cmd, peer_host)
            finally:
                self._durable = self.on_answered(cmd)
        except _ErrorReply as exc:
            return self._failed(exc, exc.text)
        except RtppError as exc:
            return self._failed(exc)
        except Exception:
            return self._crashed()
        return self._done(reply)

    def _done(self, reply: str) -> bytes:
        c = self.counters
        c.ncmds_succd += 1
        c.ncmds_repld += 1
        if _debug():
            self._log_reply(reply)
        return (reply + "\n").encode("utf-8", "surrogateescape")

    def _failed(self, exc: RtppError, text: str | None = None) -> bytes:
        """An error: counted as one; the reply is its E-code, or ``text``
        (rtpproxy answers some failures with a plain reply, e.g. an L for an
        unknown session answers 0, but still counts them as errors)."""
        c = self.counters
        c.ncmds_errs += 1
        c.ncmds_repld += 1
        reply = exc.reply() if text is None else text
        if _debug():
            if text is None:
                log.debug("command failed: E%d %s", exc.code, exc.msg)
            self._log_reply(reply)
        return (reply + "\n").encode("utf-8", "surrogateescape")

    def _crashed(self) -> bytes:
        log.exception("internal error while running a command")
        c = self.counters
        c.ncmds_errs += 1
        c.ncmds_repld += 1
        reply = "E%d" % ECode.PARSE_1
        if _debug():
            self._log_reply(reply)
        return (reply + "\n").encode("utf-8", "surrogateescape")

    @staticmethod
    def _log_reply(reply: str) -> None:
        log.debug('sending reply "%s"', reply.replace("\n", "\\n"))

    # ---- commands ------------------------------------------------------------
    def execute_now(self, cmd: Any, peer_host: str | None = None) -> str:
        """Run a command of :data:`_SYNC_COMMANDS` that :meth:`_waits` said needs no waiting."""
        now = self.clock()
        t = type(cmd)
        if t is C.Update:
            return self.update(cmd, now, peer_host)
        if t is C.Delete:
            return self.delete(cmd, now)
        if t is C.Query:
            return self.query(cmd, now)
        if t is C.Version:
            return "20040107"
        if t is C.VersionFeature:
            return "1" if caps.supports(cmd.datecode, notify=self.env.notify) else "0"
        if t is C.DeleteAll:
            for s in list(self.table):
                self.destroy(s, now)
            return "0"
        if t is C.Info:
            return self.info(cmd)
        if t is C.Stats:
            return self.stats(cmd, now)
        raise RtppError(ECode.CMDUNKN)

    def _waits(self, cmd: Any) -> bool:
        """Whether a command of :data:`_SYNC_COMMANDS` has to wait first (it
        moves a session into this process: a U/L that asks for the slow path,
        a Q for analysis counters of a session not analysed yet)."""
        t = type(cmd)
        if t is C.Update:
            return self._needs_local(cmd)
        if t is C.Query:
            return self._query_to_analyse(cmd) is not None
        return False

    def _query_to_analyse(self, cmd: C.Query) -> Session | None:
        if any(name in _ANALYSIS_NAMES for name in cmd.names):
            found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
            if found is not None and not found[0].analyzed:
                return found[0]
        return None

    async def execute(self, cmd: Any, peer_host: str | None = None) -> str:
        t = type(cmd)
        if t is C.Update:
            if self._needs_local(cmd):
                await self._localize_for(cmd)
        elif t is C.Query:
            s = self._query_to_analyse(cmd)
            if s is not None:
                await self.engine.localize(s)
                self._enable_analysis(s)
        if t in _SYNC_COMMANDS:
            return self.execute_now(cmd, peer_host)
        now = self.clock()
        if t is C.Record:
            return await self.record(cmd, now)
        if t is C.Copy:
            return await self.copy(cmd, now)
        if t is C.NoRecord:
            return await self.norecord(cmd, now)
        if t is C.Play:
            return await self.play(cmd, now)
        if t is C.StopPlay:
            return await self.stop_play(cmd, now)
        raise RtppError(ECode.CMDUNKN)

    # ---- U / L ---------------------------------------------------------------
    def _iface_for(self, cmd: C.Update, which: int) -> Iface:
        """Interface of the stream facing this command's party (which=0) or the other (1)."""
        explicit = self._explicit_iface(cmd)
        if explicit is not None:
            return explicit
        st = self.settings
        m = cmd.mods
        # rtpproxy: the first I/E letter sets the other party's address
        # (lia[1]), the second this reply's (lia[0]); the default for
        # either is the first bind address.
        if m.ifaces and which < len(m.ifaces):
            return st.ifaces[m.ifaces[which]]
        return st.ifaces[0]

    def _explicit_iface(self, cmd: C.Update) -> Iface | None:
        """rtpproxy's ulop->local_addr: from l{label}, L<addr> or R<addr>, or,
        without those and without I/E, the newest bind address of the
        command's family when the first bind address is of the other one
        (E36 if there is none).  None: no explicit local address."""
        st = self.settings
        m = cmd.mods
        if m.local_label is not None:
            for i in st.labelled + st.ifaces:
                if i.label == m.local_label:
                    return i
            raise RtppError(ECode.INVLARG_1)
        if m.local_addr is not None:
            return self._local_iface(m.local_addr)
        if m.remote_addr is not None:
            return self._iface_towards(m.remote_addr)
        if m.ifaces:
            return None
        fam = socket.AF_INET6 if m.ipv6 else socket.AF_INET
        if st.ifaces[0].family == fam:
            return None
        for i in self.bindaddrs:
            if i.family == fam:
                return i
        raise RtppError(ECode.INVLARG_6)

    def _local_iface(self, text: str) -> Iface:
        host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                info = socket.getaddrinfo(host, None, 0, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
                ip = ipaddress.ip_address(info[0][4][0])
            except (OSError, ValueError, IndexError):
                raise RtppError(ECode.INVLARG_1) from None
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return self._learn(Iface(fam, str(ip)))

    def _iface_towards(self, text: str) -> Iface:
        host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            ip = ipaddress.ip_address(host)
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.connect((str(ip), 9))
                local = s.getsockname()[0]
        except (OSError, ValueError):
            raise RtppError(ECode.INVLARG_2) from None
        return self._learn(Iface(fam, local))

    def _allocate(self, st: Stream, iface: Iface, new_session: bool) -> None:
        """Give ``st`` (RTP) and its RTCP twin a fresh port pair on ``iface``."""
        table = self.ports.get(iface.family)
        if table is None:
            table = self.ports[iface.family] = PortTable(
                self.settings.port_min, self.settings.port_max, sequential=self.settings.sequential
            )
        # a stream given its own ToS (&& S tos=) before it had a socket keeps it
        tos = st.tos if st.tos is not None else self.settings.tos
        try:
            port, (rtp, rtcp) = table.allocate(lambda p: bind_pair(iface.family, iface.addr, p, tos))
        except PortsExhausted:
            log.error("can't create listener: port range exhausted or address not available")
            raise RtppError(ECode.LSTFAIL_2 if new_session else ECode.LSTFAIL_1) from None
        twin = st.rtcp_twin
        st.pending_iface = iface  # rtpproxy's stream laddr: kept for a later N
        self._release(st, final=False)
        for s, sock, p in ((st, rtp, port), (twin, rtcp, port + 1)):
            s.sock = sock
            s.fd = sock.fileno()
            s.port = p
            s.laddr = iface.addr
            s.family = iface.family
            s.shown = iface.shown
            self.engine.add(s)
        st.tos = tos

    def _release(self, st: Stream, final: bool = True) -> None:
        """Close ``st``'s (RTP) pair and give the port back."""
        if st.sock is None:
            return
        table = self.ports.get(st.family)
        if table is not None:
            table.release(st.port)
        self.engine.remove(st, final=final)
        self.engine.remove(st.rtcp_twin, final=final)

    def _reply_addr(self, st: Stream) -> str:
        shown = st.shown
        if shown is None or st.laddr in ("0.0.0.0", "::"):
            return str(st.port)
        if st.family == socket.AF_INET6:
            return f"{st.port} {shown} 6"
        return f"{st.port} {shown}"

    def update(self, cmd: C.Update, now: float, peer_host: str | None) -> str:
        sett = self.settings
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        new_session = False
        if not cmd.lookup:
            if found is None:
                if self.draining:
                    raise RtppError(ECode.SLOWSHTDN)
                s = Session.new(cmd.call_id, cmd.from_tag, now, sett.setup_ttl)
                # a session that needs the slow path stays in this process
                s.shard = None if self._needs_local(cmd) else self.engine.assign()
                pidx = 0
                new_session = True
            else:
                s, pidx = found
        else:
            if found is None:
                log.info(
                    "lookup on unknown session, tags %s/%s",
                    cmd.from_tag,
                    cmd.to_tag,
                    extra={"callid": cmd.call_id},
                )
                raise _ErrorReply("0")
            s, idx = found
            pidx = 1 - idx
        rtp = s.rtp[pidx]
        other = s.rtp[1 - pidx]
        if new_session:
            # The creating U decides both streams' interfaces (bridging).
            this_iface = self._iface_for(cmd, 0)
            other_iface = self._iface_for(cmd, 1)
            other.pending_iface = this_iface
            self._allocate(rtp, other_iface, True)
            self.table.add(s)
            self.counters.nsess_created += 1
            if sett.analyze:
                self._enable_analysis(s)
            self.on_created(s)
            log.info(
                "new %s session, tag %s; RTP port %d",
                "IPv6" if rtp.family == socket.AF_INET6 else "IPv4",
                cmd.from_tag,
                rtp.port,
                extra={"callid": cmd.call_id},
            )
        elif rtp.sock is None or cmd.mods.new_port:
            iface = self._explicit_iface(cmd)
            if iface is None and cmd.mods.new_port and len(cmd.mods.ifaces) == 2:
                iface = self._iface_for(cmd, 1)
            if iface is None:
                iface = rtp.pending_iface
            if iface is None:
                iface = self._iface_for(cmd, 1)
            self._allocate(rtp, iface, False)
            # rtpproxy: a port given to an existing session's stream (its
            # second leg, or a new one with N) makes the session complete,
            # even when the other stream has none (Un on a one-leg session).
            if not s.complete:
                s.complete = True
                self.counters.nsess_complete += 1
        # The command's address belongs to the party behind stream 1-pidx.
        party = other
        asym = cmd.mods.asymmetric
        if asym is None:
            asym = sett.force_asymmetric or (sett.bridge and not sett.bridge_symmetric)
        remote = _remote_tuple(cmd.remote)
        rremote = _remote_tuple(cmd.remote, 1)
        party_rtcp = party.rtcp_twin
        self.engine.post(_apply_prefill, party, party_rtcp, remote, rremote, bool(asym), cmd.on_hold, now)
        # W marks this command's stream weak, for U and L alike; only U
        # without W makes the session strong.
        if cmd.mods.weak:
            s.weak[pidx] = True
        elif not cmd.lookup:
            s.strong = True
        if not cmd.lookup:
            s.notify_socket = None
            s.notify_tag = None
            if cmd.notify_socket is not None:
                self._arm_notify(s, cmd, peer_host)
        # rtpproxy: every U/L replaces the codec list of the stream facing
        # the command's party (none without c) and the ptime P uses on the
        # command's own stream (none without Z): "P ... session" towards a
        # party plays that party's codecs at the ptime the other one asked.
        s.codecs[1 - pidx] = cmd.mods.codecs
        s.codecs_text[1 - pidx] = cmd.mods.codecs_text
        s.ptime[pidx] = cmd.mods.ptime
        if s.shard is None and (cmd.mods.ptime is not None or party.hook is not None):
            # Z<ms>: RTP from this command's party is re-packetised; a U/L
            # without Z ends an earlier one (rtpproxy's rule)
            self.engine.call(H.set_resizer, party, cmd.mods.ptime, self.local_engine)
            if cmd.mods.ptime is not None:
                log.info(
                    "RTP packets from %s will be resized to %d milliseconds",
                    "caller" if party.index == 1 else "callee",
                    cmd.mods.ptime,
                    extra={"callid": s.call_id},
                )
        if not s.rtp[0].active and s.rtp[0].sock is not None and s.rtp[1].sock is not None:
            for st in s.streams():
                self.engine.post(_set_active, st)
        s.reset_ttl(now, sett.ttl if s.complete else sett.setup_ttl)
        self.table.schedule(s)
        self.on_schedule()
        if self.kernel is not None:
            # after the queued prefill: the decision sees the new addresses
            self.engine.call(self.kernel.touch, s)
        reply = self._reply_addr(rtp)
        if cmd.subcommands:
            reply = self._subcommands(reply, cmd, s, 1 - pidx, now, peer_host)
        return reply

    def _arm_notify(self, s: Session, cmd: C.Update, peer_host: str | None) -> None:
        from .notifier import match_target

        sock = cmd.notify_socket
        if match_target(sock, self.settings.notify_targets) is None:
            log.error("invalid socket name %s", sock, extra={"callid": cmd.call_id})
            return
        s.notify_socket = sock
        s.notify_tag = cmd.notify_tag
        s.notify_host = peer_host or "127.0.0.1"

    def _subcommands(
        self, reply: str, cmd: Any, s: Session, tin: int, now: float, peer_host: str | None
    ) -> str:
        # rtpproxy runs the sub-commands in order and stops at the first
        # failure; a sub-command with nothing to say shows as "0" only when
        # something is written after it.
        parts = [reply]
        pending = 0
        # rtpproxy's sub-command environment: ``tin`` is the "in" stream (for
        # U/L the one facing the command's party), the other is "out"; a
        # && L swaps them.  S without r sets "in", Sr "out".
        for sub in cmd.subcommands:
            try:
                if isinstance(sub, C.SubCopy):
                    self._fork(sub, s, tin)
                    pending += 1
                elif isinstance(sub, C.SubLookup):
                    lk = C.Update(
                        lookup=True,
                        call_id=cmd.call_id,
                        addr=sub.addr,
                        port=sub.port,
                        from_tag=cmd.from_tag,
                        to_tag=cmd.to_tag,
                        mods=sub.mods,
                        remote=sub.remote,
                        on_hold=sub.on_hold,
                    )
                    r = self.update(lk, now, peer_host)
                    if r == "0":
                        raise RtppError(ECode.SESUNKN)
                    parts.extend(["0"] * pending)
                    pending = 0
                    parts.append(r)
                    tin = 1 - tin
                elif isinstance(sub, C.SubDelete):
                    # Deletes at once, by the session's own tag; nothing
                    # left to delete is a failure.
                    if not self._delete_sessions(s.call_id, s.tag, None, sub.weak, now):
                        raise RtppError(ECode.SESUNKN)
                    pending += 1
                elif isinstance(sub, C.SubSet):
                    i = (1 - tin) if sub.reverse else tin
                    if sub.ttl is not None:
                        s.ttl_override[i] = sub.ttl
                        if not self.table.independent:
                            # One TTL shared by both streams (rtpproxy without
                            # -i): the last S ttl= sets it for both.
                            s.ttl_override[1 - i] = sub.ttl
                        s.reset_ttl(now)
                        self.table.schedule(s)
                        self.on_schedule()
                    if sub.tos is not None:
                        # rtpproxy: ToS only on an IPv4 stream (-1 otherwise)
                        st_i = s.rtp[i]
                        fam = st_i.family if st_i.sock is not None else None
                        if fam is None and st_i.pending_iface is not None:
                            fam = st_i.pending_iface.family
                        if fam != socket.AF_INET:
                            raise RtppError(ECode.SESUNKN)
                        if s.shard is None:
                            # at once: a P right after must already send with it
                            _set_tos(st_i, sub.tos)
                        else:
                            self.engine.call(_set_tos, st_i, sub.tos)
                    pending += 1
            except RtppError:
                parts.extend(["0"] * pending)
                parts.append("-1")
                break
        return " && ".join(parts)

    # ---- the slow path: analysis, Z, && C -----------------------------------------
    def _needs_local(self, cmd: C.Update) -> bool:
        """Whether this U/L makes its session use the slow path."""
        if cmd.mods.ptime is not None or (self.settings.analyze and not cmd.lookup):
            return True
        return any(isinstance(sub, C.SubCopy) for sub in cmd.subcommands)

    async def _localize_for(self, cmd: C.Update) -> None:
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if found is not None:
            await self.engine.localize(found[0])
        for sub in cmd.subcommands:
            if isinstance(sub, C.SubCopy):
                src = self.table.find(sub.call_id, sub.from_tag, sub.to_tag)
                if src is not None:
                    await self.engine.localize(src[0])

    def _enable_analysis(self, s: Session) -> None:
        s.analyzed = True
        for st in s.rtp:
            self.engine.call(H.enable_analysis, st, self.local_engine)
        if self.kernel is not None:
            self.engine.call(self.kernel.touch, s)  # the kernel lets go of it

    def _fork(self, sub: C.SubCopy, s: Session, tin: int) -> None:
        """``&& C call from to``: both streams of that session (RTP and
        RTCP) are copied to this session's parties, whose own media is then
        dropped; undone when this session ends."""
        found = self.table.find(sub.call_id, sub.from_tag, sub.to_tag)
        if found is None:
            raise RtppError(ECode.SESUNKN)
        src, sidx = found
        if src is s or src.shard is not None or s.shard is not None:
            raise RtppError(ECode.SESUNKN)
        for pipe_src, pipe_tgt in ((src.rtp, s.rtp), (src.rtcp, s.rtcp)):
            # packets received on the source's stream j leave through the
            # target's stream j: injected into its peer
            for j in (0, 1):
                sj = pipe_src[sidx if j == 0 else 1 - sidx]
                tj = pipe_tgt[tin if j == 0 else 1 - tin]
                self.engine.call(H.add_fork, sj, tj.peer, self.local_engine)
                s.forks.append((sj, tj.peer))
            for st in pipe_tgt:
                self.engine.call(H.set_drop_own, st, self.local_engine)
        if self.kernel is not None:
            for sess in (src, s):  # the kernel lets go of both
                self.engine.call(self.kernel.touch, sess)
        log.info(
            "forking session %s (tag %s) into this one", src.call_id, src.tag, extra={"callid": s.call_id}
        )

    def _teardown_hooks(self, s: Session) -> None:
        """Before ``s``'s streams close: fold their analysis into the G
        totals, drop resizer queues, and undo forks into ``s``."""
        c = self.counters
        for src, tgt in s.forks:
            self.engine.call(H.remove_forks, src, tgt)
        s.forks.clear()
        for st in s.streams():
            h = st.hook
            if h is None:
                continue
            an = h.analyzer
            if an is not None:
                r = an.stats()
                c.rtpa_nsent += r.nsent
                c.rtpa_nrcvd += r.nrcvd
                c.rtpa_ndups += r.ndups
                c.rtpa_nlost += r.nlost
                c.rtpa_perrs += r.perrs
            self.engine.call(H.drop_hook, st, self.local_engine)

    # ---- D / X -----------------------------------------------------------------
    def _delete_sessions(
        self, call_id: str, from_tag: str, to_tag: str | None, weak: bool, now: float
    ) -> bool:
        """rtpproxy's delete: True when a session matched.

        D clears the strong flag, Dw the weak flag of the stream opposite
        to the one the tag matched (a match on the session's own tag
        clears stream 1's, on the to-tag stream 0's; rtpproxy's indexing).
        A session is destroyed once no flag is left; after destroying an
        exact (not ``;N``) match, rtpproxy stops looking.
        """
        did = False
        for s, idx in self.table.find_prefix(call_id, from_tag, to_tag):
            if s.deleted:
                continue
            did = True
            if weak:
                s.weak[1 - idx] = False
            else:
                s.strong = False
            if not s.strong and not s.weak[0] and not s.weak[1]:
                self.destroy(s, now)
                if s.tag == (from_tag if idx == 0 else to_tag):
                    break
        return did

    def delete(self, cmd: C.Delete, now: float) -> str:
        if not self._delete_sessions(cmd.call_id, cmd.from_tag, cmd.to_tag, cmd.weak, now):
            raise RtppError(ECode.SESUNKN)
        return "0"

    def destroy(self, s: Session, now: float, *, timeout: bool = False) -> None:
        if s.deleted:
            return
        self.engine.sync(s)
        for fn in self.on_gone:
            fn(s, now, timeout)
        self.table.remove(s)
        if self.kernel is not None:
            self.kernel.touch(s)  # deleted: every rule of it goes
        if s.shard is None:
            self._teardown_hooks(s)
        if self.playback is not None:
            self.playback.session_gone(s)
        if self.recording is not None:
            self.recording.session_gone(s)
        # rtpproxy counts these only for complete sessions (before the
        # streams' counters move into the totals).
        if s.complete:
            nrtp = sum(1 for st in s.rtp if st.npkts_in)
            nrtcp = sum(1 for st in s.rtcp if st.npkts_in)
            if nrtp == 0:
                self.counters.nsess_nortp += 1
            elif nrtp == 1:
                self.counters.nsess_owrtp += 1
            if nrtcp == 0:
                self.counters.nsess_nortcp += 1
            elif nrtcp == 1:
                self.counters.nsess_owrtcp += 1
        log.info(
            "session on tag %s %s; RTP packets in %d/%d, relayed %d, dropped %d",
            s.tag,
            "timed out" if timeout else "deleted",
            s.rtp[1].npkts_in,
            s.rtp[0].npkts_in,
            s.rtp[0].nrelayed + s.rtp[1].nrelayed,
            s.rtp[0].ndropped + s.rtp[1].ndropped,
            extra={"callid": s.call_id},
        )
        for st in s.rtp:
            self._release(st)
        self.engine.release_session(s.shard)
        c = self.counters
        c.nsess_destroyed += 1
        if timeout:
            c.nsess_timeout += 1
        c.total_duration += max(0.0, now - s.created)
        if len(self.table) == 0 and self.draining:
            self.on_empty()

    def expire(self, now: float) -> list[Session]:
        gone = self.table.expire(now)
        for s in gone:
            self.destroy(s, now, timeout=True)
            self.on_timeout(s)
        return gone

    # ---- I / G / Q ---------------------------------------------------------------
    def info(self, cmd: C.Info) -> str:
        c = self.counters
        rcvd, relayed, _ = self.engine.totals()
        lines = [
            f"sessions created: {c.nsess_created}",
            f"active sessions: {c.nsess_created - c.nsess_destroyed}",
            f"active streams: {2 * len(self.table)}",
            f"packets received: {rcvd}",
            f"packets transmitted: {relayed + c.npkts_played}",
        ]
        if self.settings.control_allow:
            lines.append(f"commands denied: {c.pyrtpp_ncmds_denied}")
        if cmd.load:
            lines.append("average load: 0.000000")
        return "\n".join(lines)

    def global_values(self, now: float | None = None) -> dict[str, float]:
        c = self.counters
        rcvd, relayed, dropped = self.engine.totals()
        now = self.clock() if now is None else now
        t0, r0 = self._pps_sample
        pps = (rcvd - r0) / (now - t0) if now - t0 >= 1.0 else getattr(self, "_pps_last", 0.0)
        if now - t0 >= 1.0:
            self._pps_sample = (now, rcvd)
            self._pps_last = pps
        vals = {name: getattr(c, name, 0) for name in S.GLOBAL_COUNTERS}
        vals.update(npkts_rcvd=rcvd, npkts_relayed=relayed, npkts_discard=dropped, pps_in=pps)
        vals["pyrtpp_npkts_foreign"] = getattr(self.engine, "npkts_foreign", 0)
        eng = self.local_engine
        vals.update(
            npkts_resizer_in=eng.npkts_resizer_in,
            npkts_resizer_out=eng.npkts_resizer_out,
            npkts_resizer_discard=eng.npkts_resizer_discard,
        )
        vals["pyrtpp_ncmds_denied"] = c.pyrtpp_ncmds_denied
        return vals

    def stats(self, cmd: C.Stats, now: float) -> str:
        vals = self.global_values(now)
        out = []
        for name in cmd.names:
            kind = S.GLOBAL_COUNTERS[name][0]
            v = S.format_value(kind, vals[name])
            out.append(f"{name}={v}" if cmd.verbose else v)
        return " ".join(out)

    def query(self, cmd: C.Query, now: float) -> str:
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if found is None:
            raise RtppError(ECode.SESUNKN)
        if cmd.deferred_error is not None:
            raise RtppError(cmd.deferred_error)
        s, idx = found
        pidx = 1 - idx
        self.engine.sync(s)
        vals: dict[str, float] = {
            "ttl": s.ttl_left(now, self.table.independent),
            "npkts_ina": s.rtp[pidx].npkts_in,
            "npkts_ino": s.rtp[1 - pidx].npkts_in,
            "nrelayed": s.rtp[0].nrelayed + s.rtp[1].nrelayed,
            "ndropped": s.rtp[0].ndropped + s.rtp[1].ndropped,
        }
        h = s.rtp[pidx].hook
        an = h.analyzer if h is not None else None
        if an is not None and any(name in _ANALYSIS_NAMES for name in cmd.names):
            r = an.stats()
            vals.update(
                rtpa_nsent=r.nsent,
                rtpa_nrcvd=r.nrcvd,
                rtpa_ndups=r.ndups,
                rtpa_nlost=r.nlost,
                rtpa_perrs=r.perrs,
                longest_ipi=r.longest_ipi,
                rtpa_jlast=r.jlast,
                rtpa_jmax=r.jmax,
                rtpa_javg=r.javg,
            )
        names = cmd.names or S.QUERY_DEFAULT
        out = []
        for name in names:
            kind = S.QUERY_COUNTERS[name]
            v = S.format_value(kind, vals.get(name, 0))
            out.append(f"{name}={v}" if cmd.verbose else v)
        reply = " ".join(out)
        if cmd.subcommands:
            # Q's "in" stream is its own (rtpproxy's stream[i] of a
            # non-update command), the one Q's npkts_ina counts.
            reply = self._subcommands(reply, cmd, s, pidx, now, None)
        return reply

    # ---- R / C / N / P / S (effects come with the recording/playback issues) ---
    async def record(self, cmd: C.Record, now: float) -> str:
        matches = self.table.find_prefix(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if self.recording is None:
            # Without -r the recorder cannot be created: rtpproxy answers E50.
            raise RtppError(ECode.SESUNKN)
        held = [s for s, _ in matches]
        try:
            for s in held:
                await self._to_userspace(s)
                await self.engine.localize(s)
            return await self.recording.record(cmd, matches, now)
        finally:
            await self._kernel_release(held)

    async def copy(self, cmd: C.Copy, now: float) -> str:
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if found is None:
            raise RtppError(ECode.SESUNKN)
        if self.recording is None:
            raise RtppError(ECode.CPYFAIL)
        try:
            await self._to_userspace(found[0])
            await self.engine.localize(found[0])
            return await self.recording.copy(cmd, found, now)
        finally:
            await self._kernel_release([found[0]])

    async def norecord(self, cmd: C.NoRecord, now: float) -> str:
        matches = self.table.find_prefix(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if self.recording is None or not matches:
            raise RtppError(ECode.SESUNKN)
        try:
            return await self.recording.norecord(cmd, matches, now)
        finally:
            await self._kernel_release([s for s, _ in matches], held=False)

    async def play(self, cmd: C.Play, now: float) -> str:
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if found is None:
            raise RtppError(ECode.SESUNKN)
        s, idx = found
        pidx = 1 - idx
        if self.playback is not None:
            try:
                await self._to_userspace(s)
                await self.engine.localize(s)
                return await self.playback.play(cmd, s, pidx, now)
            finally:
                await self._kernel_release([s])
        if cmd.count == 0:
            return "0"
        if cmd.codecs == "session" and s.codecs[pidx] is None:
            raise RtppError(ECode.INVLARG_5)
        raise RtppError(ECode.PLRFAIL)

    async def stop_play(self, cmd: C.StopPlay, now: float) -> str:
        found = self.table.find(cmd.call_id, cmd.from_tag, cmd.to_tag)
        if found is None:
            raise RtppError(ECode.SESUNKN)
        s, idx = found
        if self.playback is not None:
            self.playback.stop(s, 1 - idx)
        await self._kernel_release([s], held=False)
        return "0"

    # ---- the kernel path (--kernel) --------------------------------------------------
    async def _to_userspace(self, s: Session) -> None:
        """R, C, P need the packets: take the session out of the kernel first."""
        if self.kernel is not None:
            await self.kernel.evict(s)

    async def _kernel_release(self, sessions: list, held: bool = True) -> None:
        """After R, C, P (held) or N, S: the kernel may take the session again."""
        if self.kernel is None:
            return
        await self.engine.barrier()  # the command's hooks (rec, mute) are in force
        for s in sessions:
            if held:
                self.kernel.release(s)
            else:
                self.engine.call(self.kernel.touch, s)

    # ---- shutdown -----------------------------------------------------------------
    def close_all(self) -> None:
        now = self.clock()
        for s in list(self.table):
            self.destroy(s, now)


# Q counters that come from the RTP analyser (asking for one turns it on).
_ANALYSIS_NAMES = frozenset(
    {
        "rtpa_nsent",
        "rtpa_nrcvd",
        "rtpa_ndups",
        "rtpa_nlost",
        "rtpa_perrs",
        "longest_ipi",
        "rtpa_jlast",
        "rtpa_jmax",
        "rtpa_javg",
    }
)


def _ip_of(i: Iface) -> Any:
    if i.addr is None:
        return ipaddress.ip_address("::" if i.family == socket.AF_INET6 else "0.0.0.0")
    try:
        return ipaddress.ip_address(i.addr)
    except ValueError:
        return i.addr


class _ErrorReply(RtppError):
    """A failed command whose reply is not an E-code (counted as an error);
    callers other than the control protocol see it as E50."""

    def __init__(self, reply: str) -> None:
        super().__init__(ECode.SESUNKN, "session not found")
        self.text = reply


# ---- jobs run in the media thread ---------------------------------------------------
def _apply_prefill(rtp: Stream, rtcp: Stream, remote, rremote, asym: bool, hold: bool, now: float) -> None:
    from ..sessions import latch

    for st in (rtp, rtcp):
        if st.asymmetric != asym:
            st.asymmetric = asym
            st.latched = asym
            if asym:
                st.untrusted = False
        st.on_hold = hold
    latch.prefill(rtp, remote, now)
    latch.prefill(rtcp, rremote, now)


def _set_active(st: Stream) -> None:
    st.active = True


def _set_tos(st: Stream, tos: int) -> None:
    st.tos = tos
    for s in (st, st.rtcp_twin):
        if s.sock is not None and s.family == socket.AF_INET:
            try:
                s.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            except OSError:
                pass
