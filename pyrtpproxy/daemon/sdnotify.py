"""systemd readiness notification (``sd_notify``), hand-rolled.

``$NOTIFY_SOCKET`` names an ``AF_UNIX``/``SOCK_DGRAM`` socket (a leading
``@`` means the abstract namespace).  One datagram per message,
newline-separated ``KEY=VALUE`` fields.  What we send:

* ``READY=1`` plus a ``STATUS=`` line once the control sockets are served
  (and, in daemon mode, the pid file written and privileges dropped);
* ``STATUS=`` with the session counts, refreshed every
  :data:`STATUS_INTERVAL` seconds when they changed (nothing is sent while
  the counts stay the same);
* ``STOPPING=1`` when draining (SIGHUP) or shutting down, then
  ``STATUS=Exited`` at exit, as rtpproxy does.

Without ``$NOTIFY_SOCKET`` everything here is a no-op.  Sending never
blocks (non-blocking socket; errors are logged at debug level and ignored).
Socket activation (``-s systemd:``, ``LISTEN_FDS``) lives in control.py.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import trio

log = logging.getLogger("pyrtpproxy")

STATUS_INTERVAL = 5.0

__all__ = ["SdNotify", "STATUS_INTERVAL", "attach", "attach_sdnotify", "status_text"]


class SdNotify:
    """A handle on ``$NOTIFY_SOCKET``; ``enabled`` is False without one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET") or ""
        self.addr: str | bytes | None = None
        self.sock: socket.socket | None = None
        self.nsent = 0
        self._stopping = False
        self._ready = False
        self._last_status: str | None = None
        if not name:
            return
        if name.startswith("@"):
            addr: str | bytes = b"\0" + os.fsencode(name[1:])
        elif name.startswith("/"):
            addr = name
        else:
            log.warning("NOTIFY_SOCKET=%s: not a UNIX socket path, ignoring it", name)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
        except OSError as exc:  # pragma: no cover
            log.warning("can't create the sd_notify socket: %s", exc)
            return
        self.addr = addr
        self.sock = sock

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram made of ``fields``; False if it could not be sent."""
        if self.sock is None or not fields:
            return False
        msg = "\n".join(fields).encode("utf-8", "replace")
        try:
            self.sock.sendto(msg, self.addr)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", msg, exc)
            return False
        self.nsent += 1
        return True

    # ---- the life cycle ------------------------------------------------------------
    def ready(self, status: str | None = None) -> None:
        if self._ready:
            return
        self._ready = True
        fields = ["READY=1"]
        if status is not None:
            fields.append("STATUS=" + status)
            self._last_status = status
        self.send(*fields)

    def status(self, status: str) -> None:
        if status == self._last_status:
            return
        self._last_status = status
        self.send("STATUS=" + status)

    def stopping(self, status: str | None = None) -> None:
        if self._stopping:
            if status is not None:
                self.status(status)
            return
        self._stopping = True
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append("STATUS=" + status)
            self._last_status = status
        self.send(*fields)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def status_text(server: Any) -> str:
    """``STATUS=`` text: the session counts (also shown by systemctl status)."""
    d = server.dispatcher
    c = d.counters
    active = len(d.table)
    head = "draining" if d.draining else "serving"
    return (
        f"{head}: {active} active session{'s' if active != 1 else ''}, "
        f"{c.nsess_created} created, {c.nsess_timeout} timed out"
    )


# ---- wiring ----------------------------------------------------------------------
def attach_sdnotify(
    server: Any, environ: Mapping[str, str] | None = None, *, interval: float = STATUS_INTERVAL
) -> SdNotify | None:
    """Send READY/STATUS/STOPPING for ``server`` when run under systemd.

    Needs ``server.on_state`` (app.Server calls its entries with ``"ready"``,
    ``"draining"`` and ``"stopping"``).  Adds a STATUS refresher service and a
    closer that sends ``STATUS=Exited``.
    """
    sd = SdNotify(environ)
    if not sd.enabled:
        return None

    def on_state(what: str) -> None:
        if what == "ready":
            sd.ready(status_text(server))
        elif what in ("draining", "stopping"):
            sd.stopping(status_text(server))

    async def refresher(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(interval)
            if sd._ready:
                sd.status(status_text(server))

    def closer() -> None:
        sd.stopping()
        sd.send("STATUS=Exited")
        sd.close()

    server.on_state.append(on_state)
    server.services.append(refresher)
    server.closers.append(closer)
    server.sdnotify = sd
    return sd


def attach(server: Any, cfg: Any) -> SdNotify | None:
    return attach_sdnotify(server)
