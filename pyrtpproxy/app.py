"""The Trio application: control servers, the expiry timer, signals.

Start order (rtpproxy's): bind every control socket and prepare the media
engine, then serve.  :class:`Server` is what tests start in-process with
``await nursery.start(server.run)``; :func:`run` is what the command line
calls with a validated Config.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
from typing import Any, Callable, Sequence

import trio

from . import control
from .dispatcher import Dispatcher, Iface, Settings
from .media import MediaEngine

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
    ) -> None:
        self.engine = MediaEngine(dup_small=dup_small, clock=clock)
        self.dispatcher = Dispatcher(settings, self.engine, clock=clock)
        self.bound = list(bound)
        self.clock = clock
        self._timer_wake = trio.Event() if _in_trio() else None
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
        await control.serve(b, self.dispatcher, task_status=task_status, on_eof=self._on_stdio_eof(b))

    def _on_stdio_eof(self, b: Any) -> Callable[[], None]:
        def eof() -> None:
            kind = getattr(getattr(b, "spec", None), "kind", "")
            if kind == "stdioc" or len(self.bound) == 1:
                self.drain()
        return eof

    def shutdown(self) -> None:
        """Stop now (SIGTERM/SIGINT)."""
        if self._done is not None:
            self._done.set()

    def drain(self) -> None:
        """Refuse new sessions (E99) and stop once none are left (SIGHUP)."""
        self.dispatcher.draining = True
        log.info("deorbiting-burn sequence started: no new sessions, exiting when idle")
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
        ev = self._timer_wake
        if ev is not None:
            ev.set()

    async def _timer(self) -> None:
        """One deadline for the whole table; no timer while nothing is due."""
        while True:
            self._timer_wake = trio.Event()
            d = self.dispatcher.table.next_deadline()
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
    )


def run(cfg: Any) -> int:
    """Bind, serve until a signal (or stdio EOF), clean up.  Returns the exit code."""
    import sys

    settings = settings_from_config(cfg)
    bound: list = []
    owner = None
    if cfg.run_as is not None:
        owner = (-1 if cfg.run_as.uid is None else cfg.run_as.uid, -1 if cfg.run_as.gid is None else cfg.run_as.gid)
    try:
        for url in cfg.control_sockets:
            spec = control.parse_control_url(url)
            bound.append(control.bind_control(spec, sock_mode=cfg.sock_mode, owner=owner, no_resolve=cfg.no_resolve))
    except (OSError, ValueError, control.ControlBindError) as exc:
        for b in bound:
            b.close()
        print(f"rtpproxy: can't bind to a socket: {exc}", file=sys.stderr)
        return 1
    server = Server(settings, bound, dup_small=getattr(cfg, "dup_small", False))
    attach_extensions(server, cfg)
    code = trio.run(_main, server)
    return code


def attach_extensions(server: Server, cfg: Any) -> None:
    """Wire the optional subsystems to ``server`` from the configuration.

    One block per subsystem; each module owns its ``attach(server, cfg)``.
    """


async def _main(server: Server) -> int:
    state = {"code": 0, "signals": 0}
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2) as sigs:

            async def watch() -> None:
                async for signum in sigs:
                    if signum == signal.SIGHUP:
                        server.drain()
                        continue
                    state["signals"] += 1
                    if state["signals"] > 1:
                        raise SystemExit(128 + signum)
                    log.info("got signal %d, shutting down", signum)
                    server.shutdown()

            nursery.start_soon(watch)
            await nursery.start(server.run)
            log.info("rtpproxy started, pid %d", __import__("os").getpid())
            await server._done.wait()
            nursery.cancel_scope.cancel()
    return state["code"]
