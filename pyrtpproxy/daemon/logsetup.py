"""Logging in rtpproxy's shape, on the stdlib.

Lines look like rtpproxy's: ``LEVEL:TAG:function:line: message`` with LEVEL
one of DBUG/INFO/WARN/ERR/CRIT and TAG the call-id of the session the line
is about, or ``GLOBAL``.  Per-session lines come from :func:`session_logger`
(or any ``extra={"callid": ...}``).

Callers only ever touch a :class:`logging.handlers.QueueHandler`; a
:class:`~logging.handlers.QueueListener` thread does the writing, so the
Trio thread never blocks on stderr or syslog.  In the foreground (``-f``)
the sink is stderr; otherwise it is syslog (``/dev/log``, ident
``rtpproxy[pid]``, the -d facility), plus stderr with ``--no_redirect``.

``RTPP_LOG_TFORM=rel`` (optionally with ``RTPP_LOG_TSTART=<monotonic
seconds>``) prefixes stderr lines with the time since start as
``hh:mm:ss.mmm/``, as rtpproxy does for its test suite.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener, SysLogHandler
from typing import TYPE_CHECKING, TextIO

from .config import LOG_FACILITIES

if TYPE_CHECKING:
    from .config import Config

LEVELS: dict[str, int] = {
    "DBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERR": logging.ERROR,
    "CRIT": logging.CRITICAL,
}
GLOBAL_TAG = "GLOBAL"
SYSLOG_IDENT = "rtpproxy"
SYSLOG_ADDRESS = "/dev/log"


def level_from_name(name: str) -> int:
    """-d level name (any case) -> logging level; KeyError if unknown."""
    return LEVELS[name.upper()]


def level_name(levelno: int) -> str:
    """logging level -> rtpproxy's four-letter-ish name."""
    if levelno >= logging.CRITICAL:
        return "CRIT"
    if levelno >= logging.ERROR:
        return "ERR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    return "DBUG"


def session_logger(call_id: str, logger: logging.Logger | None = None) -> logging.LoggerAdapter:
    """A logger whose lines are tagged with call_id instead of GLOBAL."""
    return logging.LoggerAdapter(logger or logging.getLogger("pyrtpproxy.session"), {"callid": call_id})


def _relative_start() -> float | None:
    if os.environ.get("RTPP_LOG_TFORM") != "rel":
        return None
    start = os.environ.get("RTPP_LOG_TSTART")
    if start is not None:
        try:
            return float(start)
        except ValueError:
            pass
    return time.monotonic()


class RtppFormatter(logging.Formatter):
    """``[time/]LEVEL:TAG:function:line: message``."""

    def __init__(self, relative_start: float | None = None) -> None:
        super().__init__()
        self.relative_start = relative_start

    def _time_prefix(self, record: logging.LogRecord) -> str:
        if self.relative_start is None:
            return ""
        now = getattr(record, "mono", None)
        elapsed = max(0.0, (time.monotonic() if now is None else now) - self.relative_start)
        msec_total = int(elapsed * 1000)
        secs, msec = divmod(msec_total, 1000)
        hrs, secs = divmod(secs, 3600)
        mins, secs = divmod(secs, 60)
        return f"{hrs:02d}:{mins:02d}:{secs:02d}.{msec:03d}/"

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            msg = f"{msg}\n{record.exc_text}"
        if record.stack_info:
            msg = f"{msg}\n{self.formatStack(record.stack_info)}"
        tag = getattr(record, "callid", None) or GLOBAL_TAG
        return (
            f"{self._time_prefix(record)}{level_name(record.levelno)}:{tag}:"
            f"{record.funcName}:{record.lineno}: {msg}"
        )


def _stamp_monotonic(record: logging.LogRecord) -> bool:
    record.mono = time.monotonic()
    return True


class RtppSysLogHandler(SysLogHandler):
    """SysLogHandler that loses lines quietly, as syslog(3) does.

    With no syslog daemon (no ``/dev/log``) the stdlib handler would print a
    traceback on stderr for every line; here the line is dropped, counted in
    ``dropped``, and the connection is tried again with the next one.
    """

    dropped = 0

    def handleError(self, record: logging.LogRecord) -> None:
        self.dropped += 1
        try:
            if self.socket is not None:
                self.socket.close()
        except OSError:
            pass
        self.socket = None  # emit() calls createSocket() again next time


def make_syslog_handler(facility: str, address: str = SYSLOG_ADDRESS) -> SysLogHandler:
    """SysLogHandler for -d ...:FACILITY.

    Like openlog(3), a missing syslog socket is not an error: the handler
    tries to connect again on every message and drops the lines meanwhile.
    """
    handler = RtppSysLogHandler(address=address, facility=LOG_FACILITIES[facility])
    handler.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "
    handler.setFormatter(RtppFormatter())
    return handler


# Active listeners.  Around os.fork() (daemon mode) each is stopped first, so
# every queued line is written once, by the parent, and no writer thread
# holds a lock at the fork; it is started again on both sides (a thread does
# not survive a fork), and the child's syslog ident gets its own pid.
_active: list[tuple[QueueListener, SysLogHandler | None]] = []


def _before_fork() -> None:
    for listener, _syslog in _active:
        if listener._thread is not None:
            listener.stop()


def _after_fork_in_parent() -> None:
    for listener, _syslog in _active:
        if listener._thread is None:
            listener.start()


def _after_fork_in_child() -> None:
    for listener, syslog in _active:
        listener._thread = None  # a parent's thread object would not be running here
        listener.start()
        if syslog is not None:
            syslog.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def setup_logging(
    config: Config,
    *,
    stream: TextIO | None = None,
    syslog_address: str = SYSLOG_ADDRESS,
) -> Callable[[], None]:
    """Route the root logger through a queue to the configured sinks.

    Returns a function that flushes and removes everything again (safe to
    call more than once).
    """
    handlers: list[logging.Handler] = []
    syslog: SysLogHandler | None = None
    if not config.foreground:
        syslog = make_syslog_handler(config.log_facility, syslog_address)
        handlers.append(syslog)
    if config.foreground or config.no_redirect:
        err = logging.StreamHandler(stream if stream is not None else sys.stderr)
        err.setFormatter(RtppFormatter(_relative_start()))
        handlers.append(err)

    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    qhandler = QueueHandler(q)
    qhandler.addFilter(_stamp_monotonic)
    listener = QueueListener(q, *handlers)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(qhandler)
    root.setLevel(LEVELS[config.log_level])
    listener.start()
    entry = (listener, syslog)
    _active.append(entry)

    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        root.removeHandler(qhandler)
        if entry in _active:
            _active.remove(entry)
        listener.stop()
        for h in handlers:
            h.flush()
            h.close()
        root.setLevel(old_level)

    return stop


__all__ = [
    "LEVELS",
    "RtppFormatter",
    "RtppSysLogHandler",
    "level_from_name",
    "level_name",
    "make_syslog_handler",
    "session_logger",
    "setup_logging",
]
