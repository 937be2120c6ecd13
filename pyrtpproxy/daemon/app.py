"""The Trio application: control servers, the expiry timer, signals.

Start order (rtpproxy's): bind every control socket and prepare the media
engine, then serve.  :class:`Server` is what tests start in-process with
``await nursery.start(server.run)``; :func:`run` is what the command line
calls with a validated Config.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..media.engine import MediaEngine
from ..protocol.framing import ReplyCache
from ..sessions import latch
from . import control
from .dispatcher import Dispatcher, Iface, Settings

log = logging.getLogger("pyrtpproxy")


class Server:
    """One relay: a dispatcher, a media engine and its control sockets."""

    def __init__(
        self,
        settings: Settings,
        bound: Sequence[Any] = (),
        *,
        dup_small: bool = False,
        clock: Callable[[], float] = time.monotonic,
        workers: int = 0,
    ) -> None:
        # The media thread always stamps packets with the monotonic clock (a
        # test's Trio MockClock cannot be read from another thread).
        policy = latch.Policy(learning=settings.endpoint_learning, strict=settings.strict_source)
        if workers > 0:
            from ..media.workers import ShardedEngine

            nslots = settings.port_max - settings.port_min + 2
            self.engine: Any = ShardedEngine(workers, nslots, dup_small=dup_small, policy=policy)
        else:
            self.engine = MediaEngine(dup_small=dup_small, policy=policy)
        self.dispatcher = Dispatcher(settings, self.engine, clock=clock)
        self.bound = list(bound)
        self.clock = clock
        # One retransmission cache for every UDP control socket (bounded:
        # see ReplyCache); kept here so that it can be looked at.
        self.reply_cache = ReplyCache()
        # --control-allow: None serves every source (rtpproxy's behaviour)
        self.control_allow: control.ControlAllow | None = None
        if settings.control_allow:
            self.control_allow = control.ControlAllow(settings.control_allow, self._count_denied)
        for msg in control.exposed_control_warnings(self.bound, self.control_allow):
            log.warning("%s", msg)
        self._timer_wake = trio.Event() if _in_trio() else None
        self._timer_at = math.inf  # the deadline the timer sleeps towards
        self._done: trio.Event | None = None
        self._cancel: trio.CancelScope | None = None
        self.dispatcher.on_schedule = self._poke_timer
        self.dispatcher.on_empty = self._drained
        self._closed = False
        # Extensions (recording, playback, notifications, metrics...) add
        # long-running tasks here: ``async def svc(*, task_status)``, started
        # with nursery.start before the control sockets are served ...
        self.services: list[Callable[..., Any]] = []
        # ... and synchronous clean-ups, run after every session was closed
        # (recordings flushed) and before the media engine stops.
        self.closers: list[Callable[[], None]] = []
        # ... and these before the sessions are closed (--state's last write).
        self.before_close: list[Callable[[], None]] = []
        # sd_notify (issue 5): called with "ready" (serving, pid written),
        # "draining" (SIGHUP) and "stopping" (shutdown); see announce().
        self.on_state: list[Callable[[str], None]] = []
        self.kernel: Any = None  # media.kernel.KernelPath with --kernel

    # ---- lifecycle ------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._timer_wake = trio.Event()
        self._done = trio.Event()
        self.engine.start()
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                for svc in self.services:
                    await nursery.start(svc)
                for b in self.bound:
                    await nursery.start(self._serve_one, b)
                nursery.start_soon(self._timer)
                task_status.started(self)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.close()

    async def _serve_one(self, b: Any, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await control.serve(
            b,
            self.dispatcher,
            task_status=task_status,
            on_eof=self._on_stdio_eof(b),
            reply_cache=self.reply_cache,
            allow=self.control_allow,
        )

    def _count_denied(self) -> None:
        self.dispatcher.counters.pyrtpp_ncmds_denied += 1

    def _on_stdio_eof(self, b: Any) -> Callable[[], None]:
        def eof() -> None:
            kind = getattr(getattr(b, "spec", None), "kind", "")
            if kind == "stdioc" or len(self.bound) == 1:
                self.drain()

        return eof

    def announce(self, what: str) -> None:
        """Tell ``on_state`` listeners (sd_notify) about a life-cycle step."""
        for fn in self.on_state:
            try:
                fn(what)
            except Exception:  # pragma: no cover
                log.exception("state hook failed")

    def shutdown(self) -> None:
        """Stop now (SIGTERM/SIGINT)."""
        self.announce("stopping")  # sd_notify STOPPING=1
        if self._done is not None:
            self._done.set()

    def drain(self) -> None:
        """Refuse new sessions (E99) and stop once none are left (SIGHUP)."""
        self.dispatcher.draining = True
        self.announce("draining")  # sd_notify STOPPING=1
        if len(self.dispatcher.table) == 0:
            self.shutdown()

    def _drained(self) -> None:
        self.shutdown()

    def close(self) -> None:
        """Delete every session, stop the engine, close control sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            for fn in self.before_close:
                try:
                    fn()
                except Exception:  # pragma: no cover
                    log.exception("clean-up failed")
            self.dispatcher.close_all()
        finally:
            for fn in reversed(self.closers):
                try:
                    fn()
                except Exception:  # pragma: no cover
                    log.exception("clean-up failed")
            self.engine.stop()
            for b in self.bound:
                try:
                    b.close()
                except Exception:  # pragma: no cover
                    log.exception("closing a control socket failed")

    # ---- timers ---------------------------------------------------------------
    def _poke_timer(self) -> None:
        """A session was (re)scheduled: wake the timer if it is now due earlier."""
        ev = self._timer_wake
        if ev is None or ev.is_set():
            return
        d = self.dispatcher.table.next_deadline()
        if d is not None and d < self._timer_at:
            ev.set()

    async def _timer(self) -> None:
        """One deadline for the whole table; no timer while nothing is due.

        ``_timer_at`` is the deadline it sleeps towards (inf: none), so a
        U/L that only pushes a session's deadline later wakes nothing.
        """
        while True:
            self._timer_wake = trio.Event()
            d = self.dispatcher.table.next_deadline()
            self._timer_at = math.inf if d is None else d
            if d is None:
                await self._timer_wake.wait()
                continue
            delay = d - self.clock()
            if delay > 0:
                with trio.move_on_after(delay + 0.001):
                    await self._timer_wake.wait()
                continue
            self.dispatcher.expire(self.clock())
            await trio.sleep(0)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
        return True
    except RuntimeError:
        return False


# ---- the command line's entry point -------------------------------------------------
def settings_from_config(cfg: Any) -> Settings:
    def fam(v: int) -> int:
        return socket.AF_INET6 if v == 6 else socket.AF_INET

    nprimary = 2 if cfg.bridge else 1
    ifaces = tuple(Iface(fam(b.family), b.addr, b.adv, b.label) for b in cfg.bind_addrs[:nprimary])
    labelled = tuple(Iface(fam(b.family), b.addr, b.adv, b.label) for b in cfg.bind_addrs[nprimary:])
    skip: list[int] = []
    for url in cfg.control_sockets:
        try:
            spec = control.parse_control_url(url)
        except ValueError:
            continue
        if spec.kind in ("udp", "udp6") and spec.port:
            skip.extend((spec.port, spec.port - 1))
    bridge = bool(cfg.bridge)
    return Settings(
        ifaces=ifaces,
        bridge=bridge,
        labelled=labelled,
        port_min=cfg.port_min,
        port_max=cfg.port_max,
        sequential=cfg.sequential_ports,
        skip_ports=tuple(skip),
        ttl=cfg.ttl,
        setup_ttl=cfg.setup_ttl,
        independent_ttl=cfg.independent_ttl,
        tos=cfg.tos,
        force_asymmetric=cfg.force_asymmetric,
        bridge_symmetric=cfg.bridge_symmetric,
        notify_targets=tuple(cfg.notify_targets),
        endpoint_learning=cfg.endpoint_learning,
        strict_source=cfg.strict_source,
        analyze=cfg.analyze,
        control_allow=tuple(cfg.control_allow),
    )


def run(cfg: Any) -> int:
    """The process life cycle, in rtpproxy's order.  Returns the exit code.

    Bind the control sockets (unix ones chowned to ``-u`` and given the
    ``-w`` mode), daemonise unless ``-f`` (the launcher exits 0 once we are
    ready, 1 with the reason otherwise), log "rtpproxy started", open the
    pid file, drop privileges, then serve until a signal (or stdio EOF).
    Every exit path closes the sessions (recordings), unlinks the unix
    sockets and removes the pid file.
    """
    import os
    import sys

    from . import process

    settings = settings_from_config(cfg)
    bound: list = []
    owner = process.control_socket_owner(cfg.run_as)
    mode = process.control_socket_mode(cfg.run_as, cfg.sock_mode)
    try:
        for url in cfg.control_sockets:
            spec = control.parse_control_url(url)
            b = control.bind_control(spec, sock_mode=mode, owner=owner, no_resolve=cfg.no_resolve)
            bound.append(b)
            if getattr(b, "unlink_path", None):
                b.unlink_path = os.path.abspath(b.unlink_path)  # still right after chdir("/")
    except (OSError, ValueError, control.ControlBindError) as exc:
        for b in bound:
            b.close()
        msg = str(exc) if isinstance(exc, control.ControlBindError) else f"can't bind to a socket: {exc}"
        print(f"rtpproxy: {msg}", file=sys.stderr, flush=True)
        return 1

    proc = process.Lifecycle(bound)
    server: Server | None = None
    gate: process.SignalGate | None = None
    code = 1
    try:
        pidfile = cfg.pidfile
        if pidfile is not None:
            pidfile = os.path.abspath(pidfile)
        if not cfg.foreground and not cfg.no_chdir:
            # relative paths keep meaning the start directory after chdir("/")
            cfg = _absolute_paths(cfg)
        if not cfg.foreground:
            proc.daemonize(no_chdir=cfg.no_chdir, no_redirect=cfg.no_redirect)
        holder: dict[str, Server] = {}

        def on_shutdown(signum: int) -> None:
            log.info("got signal %d, shutting down", signum)
            if "server" in holder:
                holder["server"].shutdown()

        def on_drain() -> None:
            log.info("got SIGHUP, initiating deorbiting-burn sequence")
            if "server" in holder:
                holder["server"].drain()

        gate = process.SignalGate(on_shutdown=on_shutdown, on_drain=on_drain, emergency=proc.emergency_exit)
        gate.install()
        log.info("rtpproxy started, pid %d", os.getpid())
        proc.open_pidfile(pidfile, explicit=cfg.pidfile_explicit)
        # Extensions bind their listeners (--metrics) and open the recording
        # directories while still privileged; everything else runs as -u.
        workers = cfg.workers
        if workers and cfg.record_all:
            log.warning("-a records every session in this process: --workers ignored")
            workers = 0
        if workers and getattr(cfg, "state", None):
            # worker processes keep remotes and latches to themselves
            log.warning("--state keeps every session in this process: --workers ignored")
            workers = 0
        if workers and getattr(cfg, "kernel", None):
            log.warning("--kernel relays through the in-process engine: --workers ignored")
            workers = 0
        if workers and cfg.analyze:
            log.warning("--analyze analyses every session in this process: --workers ignored")
            workers = 0
        server = Server(settings, bound, dup_small=cfg.dup_small, workers=workers)
        holder["server"] = server
        attach_extensions(server, cfg)
        proc.drop_privileges(cfg.run_as)
        warning = process.nofile_warning(cfg)
        if warning is not None:
            if cfg.nofile_limit is not None:
                log.warning("%s", warning)
            else:
                log.info("%s", warning)
        code = trio.run(_main, server, proc, gate)
    except process.StartupError as exc:
        proc.fail(str(exc))
        code = 1
    except Exception as exc:
        reason = process.describe_exception(exc)
        if not process.only_startup_errors(exc):
            log.critical("fatal error: %s", reason, exc_info=True)
        proc.fail(reason)
        code = 1
    finally:
        if gate is not None:
            gate.set_token(None)
        try:
            if server is not None:
                server.close()  # a no-op when Server.run already closed it
            else:
                for b in bound:
                    b.close()
        finally:
            proc.finish()
            log.info("rtpproxy ended")
            if gate is not None:
                gate.restore()
    return code


def _absolute_paths(cfg: Any) -> Any:
    import os

    import attrs

    changes = {
        name: os.path.abspath(getattr(cfg, name))
        for name in ("record_dir", "spool_dir", "prompt_dir")
        if getattr(cfg, name, None) is not None
    }
    return attrs.evolve(cfg, **changes) if changes else cfg


def attach_extensions(server: Server, cfg: Any) -> None:
    """Wire the optional subsystems to ``server`` from the configuration.

    One block per subsystem; each module owns its ``attach(server, cfg)``.
    """
    from .mediaproxy import attach as attach_mediaproxy
    from .metrics import attach as attach_metrics
    from .notifier import attach as attach_notify
    from .sdnotify import attach as attach_sdnotify

    attach_notify(server, cfg)
    attach_metrics(server, cfg)
    attach_sdnotify(server, cfg)
    from ..media.player import attach as attach_player
    from ..media.recorder import attach as attach_recorder

    attach_player(server, cfg)
    attach_recorder(server, cfg)
    attach_mediaproxy(server, cfg)
    attach_kernel(server, cfg)
    from .state import attach as attach_state

    attach_state(server, cfg)  # last: its service restores sessions before READY


def attach_kernel(server: Server, cfg: Any) -> None:
    """--kernel: the kernel fast path (media/kernel.py), or why not.

    ``--kernel`` without the means (root/CAP_NET_ADMIN, nf_tables,
    libnftables, IP forwarding) stops the start with the reason;
    ``--kernel=auto`` logs it once and relays in userspace.
    """
    import functools

    from ..media import kernel as kmod
    from .process import StartupError

    mode = getattr(cfg, "kernel", None)
    if not mode:
        return
    try:
        kmod.check_environment(cfg.run_as)
        if not isinstance(server.engine, MediaEngine):
            raise kmod.KernelError("media worker processes (--workers) relay in userspace")
        nft = kmod.probe()
    except kmod.KernelError as exc:
        if mode == "auto":
            log.warning("--kernel=auto: relaying in userspace: %s", exc)
            return
        raise StartupError(f"--kernel: {exc}") from None
    kp = kmod.KernelPath(nft, server.engine, dup_small=bool(getattr(cfg, "dup_small", False)))
    server.dispatcher.kernel = kp
    server.engine.on_latch = kp.on_latch
    server.services.append(functools.partial(kp.run, lambda: server.dispatcher.table))
    server.closers.append(kp.stop)
    server.kernel = kp
    # /metrics (rtpproxy_kernel_*) and /stats ("kernel")
    server.__dict__.setdefault("stats_sections", {})["kernel"] = kp.stats
    log.info(
        "kernel fast path on: nftables table inet %s%s",
        kp.table,
        "" if kp.ipv6 else "; IPv6 calls stay in userspace (net.ipv6.conf.all.forwarding is 0)",
    )


async def _main(server: Server, proc: Any = None, gate: Any = None) -> int:
    """Serve until the server stops; signals come through ``gate``.

    Once the server runs: ``proc.ready()`` writes the pid file and releases
    a waiting launcher.  Without a gate (tests), signals are left alone.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if gate is not None:
            gate.set_token(trio.lowlevel.current_trio_token())
        if proc is not None:
            proc.ready()
        server.announce("ready")  # sd_notify READY=1, after the pid file
        await server._done.wait()
        nursery.cancel_scope.cancel()
    return 0
