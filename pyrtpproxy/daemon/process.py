"""The process around the relay: daemon mode, pid file, privileges, signals.

Everything here is synchronous stdlib code that runs before (or around)
``trio.run``; :mod:`pyrtpproxy.app` drives it in rtpproxy's start order:

1. bind the control sockets (unix ones chowned to ``-u``, mode from ``-w``);
2. :meth:`Lifecycle.daemonize` unless ``-f``: the launching process waits on
   a pipe and exits 0 when the daemon reports "ready", or 1 with the reason
   the daemon sends (or "exited during start-up" if the pipe just closes);
3. log ``rtpproxy started, pid N``;
4. :meth:`Lifecycle.open_pidfile` (still privileged);
5. :meth:`Lifecycle.drop_privileges`;
6. start the server; then :meth:`Lifecycle.ready` writes ``<pid>\\n`` into
   the pid file and releases the launcher.

:meth:`Lifecycle.finish` removes the pid file on every exit path;
:class:`SignalGate` turns signals into "drain" / "shut down" calls on the
Trio thread, and exits at once (``128 + signal``) on the second fatal one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("pyrtpproxy")

PROG = "rtpproxy"

#: Signals that stop the relay at once (rtpproxy's "fatsignal" set).
FATAL_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name)
    for name in (
        "SIGTERM",
        "SIGINT",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGUSR1",
        "SIGUSR2",
    )
    if hasattr(signal, name)
)
#: The signal that starts the drain ("deorbiting burn").
DRAIN_SIGNAL = signal.SIGHUP

#: Unix control socket mode when ``-u`` names a group and ``-w`` is absent.
#: rtpproxy uses 0755 here, which denies the group the write permission a
#: connect() needs on Linux; 0660 lets the group in and nobody else.
DEFAULT_GROUP_SOCK_MODE = 0o660

#: File descriptors kept aside for control sockets, logs, recordings...
#: when checking that the port range fits the RLIMIT_NOFILE soft limit.
FD_HEADROOM = 64

_READY = b"OK"
_FAIL = b"E"


class StartupError(Exception):
    """Start-up cannot go on; str(exc) is the one-line reason."""


# ---------------------------------------------------------------- pure helpers


def control_socket_owner(run_as: Any) -> tuple[int, int] | None:
    """(uid, gid) for chown of unix control sockets (-1 keeps one), or None."""
    if run_as is None:
        return None
    uid = -1 if run_as.uid is None else run_as.uid
    gid = -1 if run_as.gid is None else run_as.gid
    return uid, gid


def control_socket_mode(run_as: Any, sock_mode: int | None) -> int | None:
    """The chmod for unix control sockets, or None to leave the umask's.

    * no ``-u``: None (``-w`` has no effect, as in rtpproxy);
    * ``-u`` with ``-w`` (non-zero): that mode;
    * ``-u user:group`` (or ``:group``) without ``-w``: 0660;
    * ``-u user`` without ``-w``: None.

    ``-w 0`` counts as "not given", like rtpproxy's sentinel.
    """
    if run_as is None:
        return None
    if sock_mode:
        return sock_mode
    if run_as.group is not None:
        return DEFAULT_GROUP_SOCK_MODE
    return None


def nofile_needed(port_min: int, port_max: int, nfamilies: int = 1) -> int:
    """Descriptors a full port range needs (every RTP and RTCP port of every
    address family's table, plus headroom)."""
    nports = port_max - port_min + 2
    return nports * max(1, nfamilies) + FD_HEADROOM


def nofile_warning(cfg: Any, soft_limit: int | None = None) -> str | None:
    """The warning to log when RLIMIT_NOFILE cannot hold the port range."""
    import resource

    if soft_limit is None:
        soft_limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return None
    families = {b.family for b in cfg.bind_addrs}
    need = nofile_needed(cfg.port_min, cfg.port_max, len(families))
    if soft_limit >= need:
        return None
    nports = cfg.port_max - cfg.port_min + 2
    return (
        f"file descriptor limit {soft_limit} is too low for the port range "
        f"{cfg.port_min}-{cfg.port_max + 1} ({nports} ports per address family, "
        f"about {need} descriptors in all): sessions will fail before the "
        f"range is used up; raise it with -L {need}"
    )


def describe_exception(exc: BaseException) -> str:
    """One line for an unexpected start-up exception (groups flattened)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_exception(e) for e in exc.exceptions)
    text = str(exc)
    if isinstance(exc, StartupError) or (text and type(exc).__module__.startswith("pyrtpproxy")):
        return text  # our own errors already say what went wrong
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def only_startup_errors(exc: BaseException) -> bool:
    """True if every leaf of ``exc`` is a :class:`StartupError`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_startup_errors(e) for e in exc.exceptions)
    return isinstance(exc, StartupError)


def _err(msg: str) -> None:
    try:
        sys.stderr.write(f"{PROG}: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- the life cycle


class Lifecycle:
    """Daemon mode, pid file and privileges of one run.

    ``bound`` are the control sockets (objects with ``close()``), closed by
    :meth:`emergency_exit`.  In the foreground ``fail`` prints the reason on
    stderr; in a daemon it sends it to the waiting launcher instead (and
    logs it).
    """

    def __init__(self, bound: Iterable[Any] = ()) -> None:
        self.bound = list(bound)
        self.daemon = False
        self._pipe: int | None = None
        self.pidfile: str | None = None
        self._pid_fd: int | None = None
        self._pid_written = False
        self._released = False

    # -- daemon mode ------------------------------------------------------------
    def daemonize(self, *, no_chdir: bool = False, no_redirect: bool = False) -> None:
        """fork, setsid, fork.  Returns in the daemon only.

        The launching process waits for :meth:`ready` / :meth:`fail` and
        exits with ``os._exit`` (it never runs the caller's clean-ups, which
        would unlink the sockets the daemon now owns).
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        rfd, wfd = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(rfd)
            os.close(wfd)
            raise StartupError(f"can't switch into daemon mode: fork: {exc.strerror}") from None
        if pid > 0:  # the launcher
            os.close(wfd)
            _launcher_wait(rfd, pid)  # never returns
        os.close(rfd)
        try:
            os.setsid()
            pid = os.fork()
        except OSError as exc:
            _report(wfd, _FAIL + f"can't switch into daemon mode: {exc.strerror}".encode())
            os._exit(1)
        if pid > 0:  # the session leader: done
            os._exit(0)
        self.daemon = True
        self._pipe = wfd
        if not no_chdir:
            os.chdir("/")
        if not no_redirect:
            _redirect_stdio()

    def ready(self) -> None:
        """Write the pid file, then tell the launcher we are up."""
        self.write_pidfile()
        self._release(_READY)

    def fail(self, reason: str) -> None:
        """Start-up failed: the launcher (or stderr) gets ``reason``."""
        if self.daemon:
            log.error("%s", reason)
            if not self._release(_FAIL + reason.encode("utf-8", "replace")):
                return
        else:
            _err(reason)

    def _release(self, msg: bytes) -> bool:
        if self._released:
            return False
        self._released = True
        fd, self._pipe = self._pipe, None
        if fd is not None:
            _report(fd, msg)
        return True

    # -- pid file ---------------------------------------------------------------
    def open_pidfile(self, path: str | None, *, explicit: bool = False) -> None:
        """Open (create) the pid file while still privileged.

        The pid is written by :meth:`ready`.  A pid file given with ``-p``
        that cannot be opened stops the start-up; the default one
        (``/var/run/rtpproxy.pid``) only gets an error in the log, as in
        rtpproxy, so an unprivileged ``rtpproxy -f`` still runs.
        """
        if path is None:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            msg = f"can't open pidfile for writing: {path}: {exc.strerror}"
            if explicit:
                raise StartupError(msg) from None
            log.error("%s", msg)
            return
        self.pidfile = path
        self._pid_fd = fd

    def write_pidfile(self) -> None:
        fd = self._pid_fd
        if fd is None or self._pid_written:
            return
        data = f"{os.getpid()}\n".encode()
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.EIO, "short write")
        except OSError as exc:
            raise StartupError(f"can't write pidfile: {self.pidfile}: {exc.strerror}") from None
        self._pid_written = True

    def remove_pidfile(self) -> None:
        """Unlink the pid file if it is still ours (safe to call twice)."""
        fd, self._pid_fd = self._pid_fd, None
        path = self.pidfile
        if fd is None or path is None:
            return
        try:
            mine = os.fstat(fd)
            try:
                there = os.stat(path)
            except FileNotFoundError:
                return
            if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                return  # replaced by someone else: not ours to remove
            try:
                os.unlink(path)
            except OSError as exc:
                # e.g. a root-owned directory after -u: leave it empty so
                # nobody mistakes a stale pid for us.
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                log.warning("can't remove pidfile %s: %s", path, exc.strerror)
        finally:
            os.close(fd)

    # -- privileges -------------------------------------------------------------
    def drop_privileges(self, run_as: Any) -> None:
        """setgroups/initgroups, setgid, setuid for ``-u user[:group]``.

        Unlike rtpproxy, the supplementary groups are reset (to the user's
        own, or just the group) and ``-u user`` also switches to the user's
        primary group, so nothing of root's group memberships survives.
        """
        if run_as is None:
            return
        uid, gid = run_as.uid, run_as.gid
        try:
            if gid is not None:
                if os.geteuid() == 0:
                    if run_as.user is not None and uid is not None:
                        os.initgroups(run_as.user, gid)
                    else:
                        os.setgroups([gid])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
        except OSError as exc:
            who = run_as.user or ""
            if run_as.group is not None:
                who += f":{run_as.group}"
            raise StartupError(f"can't switch to requested user/group {who}: {exc.strerror}") from None
        if uid is not None and uid != 0:
            try:
                os.setuid(0)
            except OSError:
                pass
            else:  # pragma: no cover - would be a kernel/libc bug
                raise StartupError("privileges could be regained after dropping them")
        log.info("running as uid %d, gid %d", os.getuid(), os.getgid())

    # -- exits ------------------------------------------------------------------
    def emergency_exit(self, code: int) -> None:
        """Second fatal signal: remove what we can and leave now."""
        try:
            self.remove_pidfile()
        except Exception:
            pass
        for b in self.bound:
            try:
                b.close()
            except Exception:
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

    def finish(self) -> None:
        """Every exit path: the pid file goes; a pending launcher is told."""
        if self.daemon and not self._released:
            self.fail("the daemon stopped during start-up")
        self.remove_pidfile()


def _report(fd: int, msg: bytes) -> None:
    try:
        view = memoryview(msg)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError:
        pass  # the launcher is gone; nothing to tell
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _launcher_wait(rfd: int, child: int) -> None:
    """In the launching process: wait for the daemon's word, then exit.

    Never returns, whatever happens (even Ctrl-C): returning would run the
    caller's clean-ups, which would unlink the daemon's sockets.
    """
    try:
        msg = _launcher_read(rfd, child)
    except KeyboardInterrupt:
        _err("interrupted while waiting for the daemon to start")
        os._exit(128 + signal.SIGINT)
    except BaseException as exc:  # pragma: no cover - defensive
        _err(f"lost track of the daemon: {exc!r}")
        os._exit(1)
    if msg == _READY:
        os._exit(0)
    if msg.startswith(_FAIL) and len(msg) > 1:
        _err(msg[1:].decode("utf-8", "replace"))
    else:
        _err("the daemon exited during start-up (see the system log)")
    os._exit(1)


def _launcher_read(rfd: int, child: int) -> bytes:
    try:
        os.waitpid(child, 0)  # the intermediate process exits at once
    except ChildProcessError:
        pass
    chunks: list[bytes] = []
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _redirect_stdio() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        for target in (0, 1, 2):
            os.dup2(fd, target)
    finally:
        if fd > 2:
            os.close(fd)


# ---------------------------------------------------------------- signals


class SignalGate:
    """Signal handlers that hand the work to the Trio thread.

    SIGHUP calls ``on_drain``; a first fatal signal (TERM, INT, XCPU, USR1,
    USR2, ...) calls ``on_shutdown(signum)``; both through
    ``run_sync_soon`` of the Trio token given to :meth:`set_token` (those
    caught before it are kept and replayed then), so they never run inside
    Trio's internals.  A second fatal signal calls
    ``emergency(128 + signum)`` right in the handler: it still works when the
    shutdown itself is stuck in synchronous code.  After Trio has ended, a
    first fatal signal needs no action (the process is already stopping).
    """

    def __init__(
        self,
        *,
        on_shutdown: Callable[[int], None],
        on_drain: Callable[[], None],
        emergency: Callable[[int], None],
    ) -> None:
        self.on_shutdown = on_shutdown
        self.on_drain = on_drain
        self.emergency = emergency
        self.fatal_count = 0
        self._token: Any = None
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (DRAIN_SIGNAL, *FATAL_SIGNALS):
            self._saved[signum] = signal.signal(signum, self._handler)

    def set_token(self, token: Any) -> None:
        """Start handing signals to Trio; ones caught before are replayed."""
        self._token = token
        pending, self._pending = self._pending, []
        for fn, args in pending:
            self._soon(fn, *args)

    def restore(self) -> None:
        saved, self._saved = self._saved, {}
        for signum, old in saved.items():
            try:
                signal.signal(signum, old)
            except (OSError, ValueError, TypeError):
                pass

    def __enter__(self) -> SignalGate:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handler(self, signum: int, _frame: Any) -> None:
        if signum == DRAIN_SIGNAL:
            self._soon(self.on_drain)
            return
        self.fatal_count += 1
        if self.fatal_count > 1:
            self.emergency(128 + signum)
            return
        self._soon(self.on_shutdown, signum)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        token = self._token
        if token is None:
            self._pending.append((fn, args))
            return
        try:
            token.run_sync_soon(fn, *args)
        except Exception:  # trio.RunFinishedError: Trio is gone, we are exiting
            pass


__all__ = [
    "DEFAULT_GROUP_SOCK_MODE",
    "DRAIN_SIGNAL",
    "FATAL_SIGNALS",
    "Lifecycle",
    "SignalGate",
    "StartupError",
    "control_socket_mode",
    "control_socket_owner",
    "describe_exception",
    "only_startup_errors",
    "nofile_needed",
    "nofile_warning",
]
