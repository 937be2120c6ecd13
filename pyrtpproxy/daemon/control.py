"""Control sockets: parse ``-s`` URLs, bind them, and serve commands.

Three steps, kept apart because the application binds every socket before
Trio starts (and before it daemonises and drops privileges):

1. :func:`parse_control_url` turns a ``-s`` argument into a :class:`ControlSpec`.
2. :func:`bind_control` (synchronous) creates the non-blocking socket(s) and
   returns a :class:`BoundControl`; its ``close()`` also unlinks a UNIX socket
   file it created.
3. :func:`serve` (Trio) answers commands on a :class:`BoundControl` with a
   :class:`CommandHandler` until cancelled.

Framing per kind (protocol.md section 1):

* ``udp``/``udp6``: one command per datagram, first token is a cookie that is
  echoed before the reply. Replies are cached for 35 s by (source address,
  cookie); a retransmission gets the cached reply and is not run again.
* ``unix``: one read per connection is one command; reply, then close.
* ``cunix``/``tcp``/``tcp6``/``systemd``: persistent connections,
  ``\\n``-terminated lines, replies in order.
* ``stdio``/``stdioc``: lines on fd 0, replies on fd 1; ``on_eof`` at EOF.

Policies chosen here (rtpproxy's behaviour unless said otherwise):

* A request longer than 8191 bytes (UDP datagram or ``unix:`` read) is
  answered as an empty command (the handler gets ``b""``, i.e. ``E5``);
  rtpproxy would silently run the first 8191 bytes.
* A stream line longer than 8191 bytes closes that connection (rtpproxy: its
  8 KiB buffer fills and the connection is dropped). On stdio it ends the
  service like EOF does.
* At most ``max_connections`` (100) connections per listening socket. When a
  new one arrives and all are taken, the connection that has been idle the
  longest (no command for the longest time, none running) is closed to make
  room; only when every one is running a command is the newcomer closed at
  once. rtpproxy refuses the newcomer instead: then whoever opens 100 idle
  connections (or trickles a byte a second on each) locks the controllers
  out until they go away.
* ``unix:`` connections get ``oneshot_timeout`` (10 s) to send their command
  and to take the reply; then they are closed. Persistent connections have no
  idle timeout (OpenSIPS keeps ``cunix``/``tcp`` connections open for ever).
* If the handler raises, the error is logged and ``E5`` is sent in its place.
  A handler that returns ``b""`` sends nothing.
* ``--control-allow`` (:class:`ControlAllow`, ours): on UDP and TCP sockets
  (IPv4 and IPv6, systemd-passed ones too), a datagram or a connection from
  a source outside the allowed networks is dropped without a reply (the
  connection is closed before anything is read), counted, and logged at
  most once per ``ControlAllow.LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import trio

from ..protocol.framing import (
    CMD_BUFLEN,
    LineFramer,
    ReplyCache,
    split_cookie,
    strip_oneshot,
)

__all__ = [
    "BoundControl",
    "CommandHandler",
    "ControlAllow",
    "ControlBindError",
    "ControlSpec",
    "DEFAULT_PORT",
    "KINDS",
    "MAX_CONNECTIONS",
    "ONESHOT_TIMEOUT",
    "bind_control",
    "parse_control_url",
    "serve",
    "systemd_listen_fd",
]

log = logging.getLogger("pyrtpproxy.control")

DEFAULT_PORT = 22222
#: Control socket kinds, in the order rtpproxy checks the prefixes.
KINDS = ("udp", "udp6", "unix", "cunix", "systemd", "stdio", "stdioc", "tcp", "tcp6")
#: Concurrent accepted connections per listening socket (rtpproxy: 100).
MAX_CONNECTIONS = 100
#: Seconds a ``unix:`` one-shot client has to send its command / read the reply.
ONESHOT_TIMEOUT = 10.0
#: Listen backlog of stream sockets (rtpproxy: 32).
LISTEN_BACKLOG = 32
#: SO_RCVBUF of TCP control sockets (rtpproxy: 16 KiB).
CONTROL_RCVBUF = 16 * 1024
#: SO_RCVBUF of UDP control sockets.  rtpproxy asks for 16 KiB (32 KiB once
#: the kernel doubles it): one 64 KB datagram waiting to be read then makes
#: the kernel drop every other datagram, a well-formed controller's too.
#: 208 KiB (Linux's usual rmem_max) holds a few such datagrams and a burst.
CONTROL_UDP_RCVBUF = 208 * 1024
#: First fd passed by systemd socket activation.
SD_LISTEN_FDS_START = 3
#: Sent when the handler raises.
INTERNAL_ERROR_REPLY = b"E5\n"
#: Peer host reported for UNIX and stdio controllers.
LOCAL_PEER = "127.0.0.1"

# serving modes of a BoundControl
DATAGRAM = "datagram"
ONESHOT = "oneshot"
STREAM = "stream"
STDIO = "stdio"

_CLOSED_ERRNOS = (errno.EBADF, errno.ENOTSOCK, errno.EINVAL)
_SUN_PATH_MAX = 108  # sizeof(sun_path) on Linux, including the NUL


class CommandHandler(Protocol):
    """What :func:`serve` calls. The dispatcher implements it."""

    async def handle(self, data: bytes, peer_host: str | None) -> bytes:
        """Run one command (no cookie; may be ``b""``) and return the whole
        reply without cookie, ending in ``b"\\n"``."""
        ...

    def note_received(self) -> None:
        """A command was received and will be run (``ncmds_rcvd``)."""
        ...

    def note_duplicate(self) -> None:
        """A UDP retransmission was answered from the reply cache
        (``ncmds_rcvd_ndups``); ``note_received`` is not called for it."""
        ...


class ControlAllow:
    """``--control-allow``: which sources may send commands.

    ``networks``: CIDR strings (``ipaddress.ip_network`` syntax).
    ``on_deny`` is called once per refused datagram or connection (the
    dispatcher counts it).  Refusals are logged at most once per
    LOG_INTERVAL seconds, with how many were not logged in between.
    """

    LOG_INTERVAL = 10.0

    def __init__(
        self,
        networks: tuple[str, ...],
        on_deny: Callable[[], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self.on_deny = on_deny
        self.denied = 0
        self._clock = clock or time.monotonic
        self._next_log = -1e18
        self._unlogged = 0

    def permits(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def deny(self, spec: Any, addr: Any, what: str) -> None:
        self.denied += 1
        if self.on_deny is not None:
            self.on_deny()
        now = self._clock()
        if now < self._next_log:
            self._unlogged += 1
            return
        self._next_log = now + self.LOG_INTERVAL
        more = f" ({self._unlogged} more not logged)" if self._unlogged else ""
        self._unlogged = 0
        host = addr[0] if isinstance(addr, tuple) and addr else addr
        log.warning("control socket %s: %s from %s refused by --control-allow%s", spec, what, host, more)


def _is_inet(bound: Any) -> bool:
    sock = getattr(bound, "sock", None)
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def exposed_control_warnings(bound: Any, allow: ControlAllow | None) -> list[str]:
    """Start-up warnings for UDP/TCP control sockets on a non-loopback address
    when no ``--control-allow`` restricts them."""
    if allow is not None:
        return []
    out = []
    for b in bound:
        if not _is_inet(b):
            continue
        try:
            host = b.sock.getsockname()[0]
        except OSError:  # pragma: no cover
            continue
        if not _is_loopback(host):
            out.append(
                f"control socket {b.spec} listens on {host}, a non-loopback address, and the control "
                "protocol has no authentication: anyone who can reach it controls the relay "
                "(use --control-allow, a firewall, or a loopback/UNIX socket)"
            )
    return out


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class ControlBindError(Exception):
    """A control socket could not be set up; the message says why."""


# --------------------------------------------------------------------------
# URL parsing


@attrs.frozen
class ControlSpec:
    """A parsed ``-s`` argument.

    ``kind`` is one of :data:`KINDS`. ``host``/``port`` are set for
    udp/udp6/tcp/tcp6 (``host`` ``"*"`` means every address), ``path`` for
    unix/cunix. ``text`` is the argument as given.
    """

    kind: str
    host: str | None = None
    port: int = 0
    path: str | None = None
    text: str = attrs.field(default="", eq=False)

    @property
    def is_datagram(self) -> bool:
        return self.kind in ("udp", "udp6")

    @property
    def is_unix(self) -> bool:
        return self.kind in ("unix", "cunix")

    @property
    def is_stdio(self) -> bool:
        return self.kind in ("stdio", "stdioc")

    @property
    def family(self) -> int | None:
        if self.kind in ("udp", "tcp"):
            return socket.AF_INET
        if self.kind in ("udp6", "tcp6"):
            return socket.AF_INET6
        if self.is_unix:
            return socket.AF_UNIX
        return None

    def __str__(self) -> str:
        if self.host is not None:
            return f"{self.kind}:{self.host}:{self.port}"
        if self.path is not None:
            return f"{self.kind}:{self.path}"
        return f"{self.kind}:"


_PREFIXES = tuple((k, k + ":") for k in KINDS)


def parse_control_url(s: str) -> ControlSpec:
    """Parse a control socket argument (``-s``).

    ``udp:HOST[:PORT]``, ``udp6:HOST[:PORT]``, ``tcp:…``, ``tcp6:…``: the last
    ``:`` separates the port (so ``udp6:::1:22326``; ``udp6:::1`` would be
    host ``:`` and is rejected); no port or an empty one means 22222.
    ``unix:PATH``, ``cunix:PATH``, or a bare ``PATH`` (no known prefix).
    ``stdio:``, ``stdioc:``, ``systemd:`` take nothing after the colon.
    Raises ``ValueError`` with a readable message.
    """
    if not isinstance(s, str):
        raise TypeError("control socket must be a str")
    if "\0" in s:
        raise ValueError(f"invalid control socket {s!r}: NUL character")
    kind, rest = "unix", s
    for k, prefix in _PREFIXES:
        if s.startswith(prefix):
            kind, rest = k, s[len(prefix) :]
            break

    if kind in ("unix", "cunix"):
        if not rest:
            raise ValueError(f"invalid control socket {s!r}: empty socket path")
        if len(os.fsencode(rest)) >= _SUN_PATH_MAX:
            raise ValueError(
                f"invalid control socket {s!r}: socket name is too long (at most {_SUN_PATH_MAX - 1} bytes)"
            )
        return ControlSpec(kind=kind, path=rest, text=s)

    if kind in ("stdio", "stdioc", "systemd"):
        if rest:
            raise ValueError(f"invalid control socket {s!r}: nothing may follow {kind + ':'!r}")
        return ControlSpec(kind=kind, text=s)

    # udp, udp6, tcp, tcp6
    host, sep, port_s = rest.rpartition(":")
    if not sep:
        host, port_s = rest, ""
    if not host:
        raise ValueError(f"invalid control socket {s!r}: missing host (use '*' for every address)")
    if host.startswith("[") or host.endswith("]"):
        raise ValueError(
            f"invalid control socket {s!r}: brackets are not accepted around "
            f"IPv6 addresses; the last ':' separates the port, e.g. "
            f"'{kind}:::1:{DEFAULT_PORT}'"
        )
    if any(c.isspace() for c in host):
        raise ValueError(f"invalid control socket {s!r}: blank in host")
    if ":" in host:
        if kind in ("udp", "tcp"):
            raise ValueError(
                f"invalid control socket {s!r}: {host!r} is not an IPv4 host (IPv6 needs '{kind}6:')"
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid control socket {s!r}: {host!r} is not an IPv6 address "
                f"(the last ':' separates the port, so give one: "
                f"'{kind}:{rest}:{DEFAULT_PORT}')"
            ) from None
    if port_s == "":
        port = DEFAULT_PORT
    else:
        if not (port_s.isascii() and port_s.isdigit()):
            raise ValueError(f"invalid control socket {s!r}: bad port {port_s!r}")
        port = int(port_s)
        if port > 65535:
            raise ValueError(f"invalid control socket {s!r}: port {port} out of range 0..65535")
    return ControlSpec(kind=kind, host=host, port=port, text=s)


# --------------------------------------------------------------------------
# Binding


@attrs.define(eq=False)
class BoundControl:
    """Bound (not yet served) control socket(s) for one :class:`ControlSpec`.

    ``mode`` is ``"datagram"``, ``"oneshot"``, ``"stream"`` or ``"stdio"``.
    ``sock`` is the non-blocking stdlib socket (``None`` for stdio, which
    holds duplicates of the stdin/stdout fds in ``in_fd``/``out_fd``).
    ``close()`` closes everything and unlinks a UNIX socket file created by
    :func:`bind_control` (if it is still the same file). It is idempotent;
    the object is also a context manager.
    """

    spec: ControlSpec
    mode: str
    sock: socket.socket | None = None
    in_fd: int | None = None
    out_fd: int | None = None
    unlink_path: str | None = None
    _unlink_id: tuple[int, int] | None = None
    closed: bool = False

    @property
    def sockname(self) -> Any:
        """``getsockname()`` of the socket (the real port when bound to 0)."""
        if self.sock is None:
            return None
        return self.sock.getsockname()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            self.sock.close()
        for fd in (self.in_fd, self.out_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.unlink_path is not None:
            try:
                st = os.lstat(self.unlink_path)
            except OSError:
                return
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._unlink_id:
                try:
                    os.unlink(self.unlink_path)
                except OSError as e:
                    log.warning("can't unlink %s: %s", self.unlink_path, e.strerror)

    def __enter__(self) -> BoundControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def systemd_listen_fd(environ: Mapping[str, str] | None = None) -> int:
    """Return the single fd passed by systemd socket activation.

    Requires ``LISTEN_PID`` to be this process and ``LISTEN_FDS`` to be 1;
    raises :class:`ControlBindError` otherwise. Like ``sd_listen_fds(0)`` it
    sets close-on-exec on the fd and leaves the environment alone.
    """
    env = os.environ if environ is None else environ
    pid_s = env.get("LISTEN_PID")
    nfds_s = env.get("LISTEN_FDS")
    if not pid_s or not nfds_s:
        raise ControlBindError("systemd: no socket passed by systemd (LISTEN_PID/LISTEN_FDS not set)")
    try:
        pid = int(pid_s)
        nfds = int(nfds_s)
    except ValueError:
        raise ControlBindError(f"systemd: bad LISTEN_PID/LISTEN_FDS ({pid_s!r}, {nfds_s!r})") from None
    if pid != os.getpid():
        raise ControlBindError(f"systemd: the passed sockets are for pid {pid}, not this process")
    if nfds > 1:
        raise ControlBindError("systemd: too many file descriptors received")
    if nfds < 1:
        raise ControlBindError("systemd: no socket passed by systemd")
    fd = SD_LISTEN_FDS_START
    try:
        os.set_inheritable(fd, False)
    except OSError as e:
        raise ControlBindError(f"systemd: fd {fd}: {e.strerror}") from None
    return fd


def _resolve(spec: ControlSpec, socktype: int, no_resolve: bool) -> tuple[int, Any]:
    family = spec.family
    assert family is not None and spec.host is not None
    host: str | None = spec.host
    if (
        host == "*"
        or (family == socket.AF_INET and host == "0.0.0.0")
        or (family == socket.AF_INET6 and host == "::")
    ):
        host = None
    flags = socket.AI_PASSIVE
    if host is not None and no_resolve:
        flags |= socket.AI_NUMERICHOST
    try:
        infos = socket.getaddrinfo(host, spec.port, family, socktype, 0, flags)
    except socket.gaierror as e:
        raise ControlBindError(
            f"can't resolve {spec.host!r} for control socket {spec.text or spec}: {e.strerror}"
        ) from None
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise ControlBindError(f"can't resolve {spec.host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def _bind_inet(spec: ControlSpec, socktype: int, no_resolve: bool) -> socket.socket:
    family, sockaddr = _resolve(spec, socktype, no_resolve)
    sock = socket.socket(family, socktype)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if socktype == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            size = CONTROL_UDP_RCVBUF if socktype == socket.SOCK_DGRAM else CONTROL_RCVBUF
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as e:  # pragma: no cover - not expected on Linux
            log.error("unable to set 16K receive buffer size on controlfd: %s", e)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            raise ControlBindError(f"can't bind to a socket: {spec.text or spec}: {e.strerror}") from None
        if socktype == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(spec: ControlSpec, sock_mode: int | None, owner: tuple[int, int] | None) -> BoundControl:
    path = spec.path
    assert path is not None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ControlBindError(f"can't bind to a socket: {path}: {e.strerror}") from None
    else:
        # rtpproxy removes whatever is there.  We replace an old socket and
        # an empty regular file (a placeholder such as mktemp(1) makes; its
        # test suite passes one), and refuse anything that holds data.
        placeholder = stat.S_ISREG(st.st_mode) and st.st_size == 0
        if not stat.S_ISSOCK(st.st_mode) and not placeholder:
            raise ControlBindError(
                f"can't bind to a socket: {path}: the path exists and is not a socket "
                "or an empty file; refusing to remove it"
            )
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ControlBindError(f"can't remove the old socket {path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        try:
            sock.bind(path)
        except OSError as e:
            raise ControlBindError(f"can't bind to a socket: {path}: {e.strerror}") from None
        bound = True
        st = os.lstat(path)
        if owner is not None:
            try:
                os.chown(path, owner[0], owner[1])
            except OSError as e:
                raise ControlBindError(f"can't set owner of the socket: {path}: {e.strerror}") from None
        if sock_mode is not None:
            try:
                os.chmod(path, sock_mode)
            except OSError as e:
                raise ControlBindError(
                    f"can't set mode {sock_mode:o} on the socket: {path}: {e.strerror}"
                ) from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    mode = ONESHOT if spec.kind == "unix" else STREAM
    return BoundControl(
        spec=spec,
        mode=mode,
        sock=sock,
        unlink_path=path,
        unlink_id=(st.st_dev, st.st_ino),
    )


def bind_control(
    spec: ControlSpec,
    *,
    sock_mode: int | None = None,
    owner: tuple[int, int] | None = None,
    no_resolve: bool = False,
    environ: Mapping[str, str] | None = None,
    stdio_fds: tuple[int, int] = (0, 1),
) -> BoundControl:
    """Create the socket(s) for ``spec``; synchronous, call before Trio runs.

    * udp/udp6: datagram socket, SO_RCVBUF 208 KiB, IPV6_V6ONLY for udp6.
    * tcp/tcp6: listening socket (backlog 32, SO_REUSEADDR, V6ONLY for tcp6).
    * unix/cunix: an existing path is removed only if it is a socket;
      ``owner`` ``(uid, gid)`` is applied with chown (-1 keeps one) and then
      ``sock_mode`` with chmod, before listen(32). ``close()`` unlinks it.
    * systemd: the one fd from LISTEN_FDS/LISTEN_PID (stream: lines;
      a datagram socket is served like udp).
    * stdio/stdioc: duplicates of ``stdio_fds`` (default stdin, stdout).

    ``no_resolve``: numeric hosts only (``--no_resolve``).
    Raises :class:`ControlBindError`.
    """
    kind = spec.kind
    if kind in ("udp", "udp6"):
        sock = _bind_inet(spec, socket.SOCK_DGRAM, no_resolve)
        return BoundControl(spec=spec, mode=DATAGRAM, sock=sock)
    if kind in ("tcp", "tcp6"):
        sock = _bind_inet(spec, socket.SOCK_STREAM, no_resolve)
        return BoundControl(spec=spec, mode=STREAM, sock=sock)
    if kind in ("unix", "cunix"):
        return _bind_unix(spec, sock_mode, owner)
    if kind == "systemd":
        fd = systemd_listen_fd(environ)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ControlBindError(f"systemd: fd {fd} is not a socket: {e.strerror}") from None
        try:
            if sock.type == socket.SOCK_DGRAM:
                mode = DATAGRAM
            elif sock.type == socket.SOCK_STREAM:
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    raise ControlBindError(
                        f"systemd: fd {fd} is not a listening socket (use Accept=false in the .socket unit)"
                    )
                mode = STREAM
            else:
                raise ControlBindError(f"systemd: fd {fd} has an unsupported socket type")
            sock.setblocking(False)
        except BaseException:
            sock.detach()
            raise
        return BoundControl(spec=spec, mode=mode, sock=sock)
    if kind in ("stdio", "stdioc"):
        try:
            in_fd = os.dup(stdio_fds[0])
        except OSError as e:
            raise ControlBindError(f"{kind}: can't use stdin: {e.strerror}") from None
        try:
            out_fd = os.dup(stdio_fds[1])
        except OSError as e:
            os.close(in_fd)
            raise ControlBindError(f"{kind}: can't use stdout: {e.strerror}") from None
        return BoundControl(spec=spec, mode=STDIO, in_fd=in_fd, out_fd=out_fd)
    raise ValueError(f"unknown control socket kind {kind!r}")  # pragma: no cover


# --------------------------------------------------------------------------
# Serving


async def _run_handler(handler: CommandHandler, data: bytes, peer: str | None) -> bytes:
    now = getattr(handler, "handle_now", None)
    if now is not None:
        reply = _run_now(now, data, peer)
        if reply is not None:
            return reply
    try:
        reply = await handler.handle(data, peer)
    except Exception:
        log.exception("command handler failed on %r", data[:200])
        return INTERNAL_ERROR_REPLY
    return _checked(reply)


def _run_now(now: Callable[[bytes, str | None], Any], data: bytes, peer: str | None) -> bytes | None:
    """The handler's synchronous fast path (``handle_now``), if it takes the command."""
    try:
        reply = now(data, peer)
    except Exception:
        log.exception("command handler failed on %r", data[:200])
        return INTERNAL_ERROR_REPLY
    return None if reply is None else _checked(reply)


def _checked(reply: Any) -> bytes:
    if type(reply) is bytes:
        return reply
    if not isinstance(reply, (bytes, bytearray, memoryview)):
        log.error("command handler returned %r, not bytes", type(reply).__name__)
        return INTERNAL_ERROR_REPLY
    return bytes(reply)


def _peer_host(addr: Any) -> str:
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return addr[0]
    return LOCAL_PEER


async def serve(
    bound: BoundControl,
    handler: CommandHandler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    on_eof: Callable[[], None] | None = None,
    reply_cache: ReplyCache | None = None,
    max_connections: int = MAX_CONNECTIONS,
    oneshot_timeout: float = ONESHOT_TIMEOUT,
    allow: ControlAllow | None = None,
) -> None:
    """Serve commands on ``bound`` until cancelled.

    Calls ``task_status.started()`` once it is accepting. ``on_eof`` is called
    (stdio/stdioc only) when stdin reaches EOF or fails; ``serve`` then
    returns. ``reply_cache``: share one :class:`ReplyCache` between several
    UDP sockets (default: one per call). The sockets are not closed here;
    that is ``bound.close()``'s job, after ``serve`` has been cancelled.
    """
    if bound.closed:
        raise trio.ClosedResourceError("control socket already closed")
    if allow is not None and not _is_inet(bound):
        allow = None  # UNIX and stdio controllers are local
    if bound.mode == DATAGRAM:
        if reply_cache is None:
            reply_cache = ReplyCache()
        await _serve_datagram(bound, handler, reply_cache, task_status, allow)
    elif bound.mode in (ONESHOT, STREAM):
        await _serve_listener(bound, handler, task_status, max_connections, oneshot_timeout, allow)
    elif bound.mode == STDIO:
        await _serve_stdio(bound, handler, task_status, on_eof)
    else:  # pragma: no cover
        raise ValueError(f"unknown mode {bound.mode!r}")


#: Datagrams answered per wake-up of a UDP control socket before it yields.
DATAGRAM_BATCH = 64


async def _serve_datagram(
    bound: BoundControl,
    handler: CommandHandler,
    cache: ReplyCache,
    task_status: trio.TaskStatus[None],
    allow: ControlAllow | None = None,
) -> None:
    assert bound.sock is not None
    tsock = trio.socket.from_stdlib_socket(bound.sock)
    # --state: a handler with handle_deferred runs each command at once, in
    # order, and hands back what the reply waits for (its change durable);
    # the wait happens in a task of its own, so later commands go on and
    # share the next group commit.  A retransmission of a command whose
    # reply is still waiting is dropped (the reply comes).
    deferred = (
        getattr(handler, "handle_deferred", None) if getattr(handler, "defers_replies", False) else None
    )
    waiting: set[tuple] = set()
    async with trio.open_nursery() as nursery:
        await _datagram_loop(
            bound, bound.sock, tsock, handler, cache, task_status, deferred, waiting, nursery, allow
        )


async def _send_when_durable(
    raw: socket.socket,
    tsock: Any,
    wait: Any,
    reply: bytes,
    key: tuple,
    addr: Any,
    cache: ReplyCache,
    waiting: set,
) -> None:
    try:
        await wait()
    except Exception:  # pragma: no cover - the wait never raises; reply anyway
        log.exception("waiting for a reply's durability failed")
    finally:
        waiting.discard(key)
    cache.put(key, reply, trio.current_time())
    await _sendto(raw, tsock, reply, addr)


async def _datagram_loop(
    bound: BoundControl,
    raw: socket.socket,
    tsock: Any,
    handler: CommandHandler,
    cache: ReplyCache,
    task_status: Any,
    deferred: Any,
    waiting: set,
    nursery: Any,
    allow: ControlAllow | None,
) -> None:
    """Wait until the socket is readable, then answer what is queued.

    The socket is read and written directly (it is non-blocking): up to
    :data:`DATAGRAM_BATCH` datagrams per wake-up, each command run by the
    handler's ``handle_now`` when it takes it (no Trio task switch, no lock),
    else awaited through ``handle`` (or ``handle_deferred``).
    """
    task_status.started()
    bufsize = CMD_BUFLEN  # one more than rtpproxy keeps, to spot oversize
    now_fn = getattr(handler, "handle_now", None)
    recvfrom = raw.recvfrom
    wait_readable = trio.lowlevel.wait_readable
    cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
    while True:
        try:
            await wait_readable(raw)
        except OSError as e:  # pragma: no cover - closed under us
            raise trio.ClosedResourceError(f"control socket {bound.spec} closed") from e
        # One turn for whatever woke up with us (a signal's drain or shutdown,
        # the expiry timer) before the batch: a command sent after SIGHUP
        # then meets the drain, as it did when every recvfrom yielded.
        await cancel_shielded_checkpoint()
        t = trio.current_time()
        for _ in range(DATAGRAM_BATCH):
            try:
                data, addr = recvfrom(bufsize)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError(f"control socket {bound.spec} closed") from e
                # e.g. ECONNREFUSED left by an ICMP error; never fatal
                log.debug("recvfrom on %s: %s", bound.spec, e)
                continue
            if allow is not None and not allow.permits(addr[0]):
                allow.deny(bound.spec, addr, "command")
                continue
            cookie, cmd = split_cookie(data)
            if len(data) >= bufsize:
                log.warning(
                    "control datagram from %s too long (>= %d bytes), rejected",
                    addr,
                    bufsize,
                )
                cmd = b""
            peer = _peer_host(addr)
            if cookie is None:
                # nothing usable: rtpproxy answers a bare E5 (not cached)
                handler.note_received()
                reply = await _run_handler(handler, b"", peer)
            else:
                key = (addr[0], addr[1], cookie)
                cached = cache.get(key, t)
                if cached is not None:
                    handler.note_duplicate()
                    await _sendto(raw, tsock, cached, addr)
                    continue
                if key in waiting:
                    handler.note_duplicate()
                    continue
                handler.note_received()
                reply = _run_now(now_fn, cmd, peer) if now_fn is not None else None
                if reply is None:
                    if deferred is not None:
                        try:
                            reply, wait = await deferred(cmd, peer)
                        except Exception:
                            log.exception("command handler failed on %r", cmd[:200])
                            reply, wait = INTERNAL_ERROR_REPLY, None
                        if wait is not None and reply:
                            waiting.add(key)
                            nursery.start_soon(
                                _send_when_durable,
                                raw,
                                tsock,
                                wait,
                                cookie + b" " + bytes(reply),
                                key,
                                addr,
                                cache,
                                waiting,
                            )
                            continue
                    else:
                        reply = await _run_handler(handler, cmd, peer)
                    t = trio.current_time()
                if reply:
                    reply = cookie + b" " + reply
                    cache.put(key, reply, t)
            if reply:
                await _sendto(raw, tsock, reply, addr)


async def _sendto(raw: socket.socket, tsock: trio.socket.SocketType, data: bytes, addr: Any) -> None:
    """Send a reply on the socket directly; only one the kernel cannot take
    at once waits in Trio."""
    try:
        try:
            raw.sendto(data, addr)
        except BlockingIOError:
            await tsock.sendto(data, addr)
    except OSError as e:
        log.warning("can't send control reply to %s: %s", addr, e)


@attrs.define(eq=False)
class _Conn:
    """One accepted connection: what eviction looks at."""

    scope: trio.CancelScope
    last: float  # trio time of accept or of the last command
    busy: bool = False  # a command is running


@attrs.define(eq=False)
class _ConnCount:
    conns: dict[int, _Conn] = attrs.Factory(dict)
    ids: int = 0
    evicted: int = 0
    full_logged: bool = False

    @property
    def active(self) -> int:
        return len(self.conns)

    def evict_idlest(self) -> bool:
        """Close the connection idle the longest; False if all are busy."""
        idle = [(c.last, k) for k, c in self.conns.items() if not c.busy]
        if not idle:
            return False
        _, k = min(idle)
        self.conns.pop(k).scope.cancel()
        self.evicted += 1
        return True


async def _serve_listener(
    bound: BoundControl,
    handler: CommandHandler,
    task_status: trio.TaskStatus[None],
    max_connections: int,
    oneshot_timeout: float,
    allow: ControlAllow | None = None,
) -> None:
    """Accept connections; the sockets are used directly (non-blocking), Trio
    only waits for readiness.

    A ``unix:`` one-shot request that is already there when the connection is
    accepted, and that the handler answers at once (``handle_now``), is
    answered and closed right here; anything else gets a task.
    """
    lsock = bound.sock
    assert lsock is not None
    is_unix = lsock.family == socket.AF_UNIX
    oneshot = bound.mode == ONESHOT
    conn_fn = _oneshot_conn if oneshot else _stream_conn
    now_fn = getattr(handler, "handle_now", None)
    count = _ConnCount()
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                conn, addr = lsock.accept()
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(lsock)
                except OSError as e:  # pragma: no cover - closed under us
                    raise trio.ClosedResourceError(f"control socket {bound.spec} closed") from e
                continue
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                if e.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError(f"control socket {bound.spec} closed") from e
                log.error("can't accept connection on control socket %s: %s", bound.spec, e)
                # EMFILE/ENFILE/ENOBUFS/ENOMEM: back off instead of spinning
                await trio.sleep(0.1)
                continue
            if allow is not None and not (isinstance(addr, tuple) and allow.permits(addr[0])):
                conn.close()
                allow.deny(bound.spec, addr, "connection")
                continue
            conn.setblocking(False)
            peer = LOCAL_PEER if is_unix else _peer_host(addr)
            first = None
            if oneshot and now_fn is not None:  # needs no slot when answered here
                first = _oneshot_now(conn, handler, now_fn, peer)
                if first == b"":
                    continue
            if count.active >= max_connections:
                if not count.evict_idlest():
                    conn.close()
                    if not count.full_logged:
                        log.warning(
                            "control socket %s: %d connections open, all busy, refusing more",
                            bound.spec,
                            count.active,
                        )
                        count.full_logged = True
                    continue
                if count.evicted & (count.evicted - 1) == 0:
                    # a bounded log: the 1st, 2nd, 4th, 8th... eviction
                    log.warning(
                        "control socket %s: %d connections open, closed the one idle the longest (%d so far)",
                        bound.spec,
                        max_connections,
                        count.evicted,
                    )
            count.ids += 1
            entry = _Conn(trio.CancelScope(), trio.current_time())
            count.conns[count.ids] = entry
            nursery.start_soon(
                _conn_wrapper,
                conn_fn,
                conn,
                handler,
                peer,
                count,
                count.ids,
                max_connections,
                oneshot_timeout,
                first,
            )


def _oneshot_now(
    conn: socket.socket, handler: CommandHandler, now_fn: Callable[..., Any], peer: str
) -> bytes | None:
    """Answer a ``unix:`` request on the spot if it is there and never waits.

    Returns ``b""`` when the connection was dealt with (answered, or found
    closed) and closed; else what was read (``None``: nothing yet), for the
    connection's task.
    """
    try:
        data = conn.recv(CMD_BUFLEN)
    except BlockingIOError:
        return None
    except OSError:
        conn.close()
        return b""
    if not data:
        conn.close()  # connected and left: costs nothing
        return b""
    # Counted before it runs (a G counts itself in ncmds_rcvd, as in
    # rtpproxy); the connection's task does not count what it is handed.
    handler.note_received()
    if len(data) >= CMD_BUFLEN:
        return data  # the task rejects it, as it would have
    reply = _run_now(now_fn, strip_oneshot(data), peer)
    if reply is None:
        return data
    try:
        if reply:
            conn.send(reply)  # a fresh socket takes a reply of any usual size at once
    except OSError as e:
        log.debug("unix control connection: %s", e)
    conn.close()
    return b""


async def _conn_wrapper(
    fn: Callable[..., Any],
    conn: socket.socket,
    handler: CommandHandler,
    peer: str,
    count: _ConnCount,
    key: int,
    max_connections: int,
    oneshot_timeout: float,
    first: bytes | None = None,
) -> None:
    entry = count.conns[key]
    try:
        with entry.scope:
            await fn(conn, _Tracked(handler, entry), peer, oneshot_timeout, first)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log.debug("control connection from %s: %s", peer, e)
    finally:
        conn.close()
        if count.conns.get(key) is entry:
            del count.conns[key]
        if count.active < max_connections:
            count.full_logged = False


class _Tracked:
    """The handler as one connection sees it: marks the connection busy
    while its command runs (not evicted then) and notes when it last ran one."""

    def __init__(self, handler: CommandHandler, entry: _Conn) -> None:
        self._handler = handler
        self._entry = entry
        self.note_received = handler.note_received
        self.note_duplicate = handler.note_duplicate
        self._now = getattr(handler, "handle_now", None)

    async def handle(self, data: bytes, peer_host: str | None) -> bytes:
        e = self._entry
        e.busy = True
        try:
            return await self._handler.handle(data, peer_host)
        finally:
            e.busy = False
            e.last = trio.current_time()

    def handle_now(self, data: bytes, peer_host: str | None) -> bytes | None:
        reply = self._now(data, peer_host) if self._now is not None else None
        if reply is not None:
            self._entry.last = trio.current_time()
        return reply


async def _recv(conn: socket.socket, size: int) -> bytes:
    """Read what is there, waiting (in Trio) only when nothing is."""
    while True:
        try:
            return conn.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)


async def _send_all(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = conn.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(conn)
            continue
        view = view[n:]


async def _oneshot_conn(
    conn: socket.socket,
    handler: CommandHandler,
    peer: str,
    timeout: float,
    first: bytes | None = None,
) -> None:
    """rtpproxy's ``unix:``: one read is the command (``first``, if the accept
    loop already read it), then the reply, then close."""
    data = first
    if data is None:
        data = b""
        with trio.move_on_after(timeout) as scope:
            data = await _recv(conn, CMD_BUFLEN)
        if scope.cancelled_caught:
            log.debug("unix control connection sent nothing in %g s, closed", timeout)
            return
        if not data:
            return  # connected and left: costs nothing
        handler.note_received()  # (``first`` was counted where it was read)
    if len(data) >= CMD_BUFLEN:
        log.warning("unix control command too long (>= %d bytes), rejected", CMD_BUFLEN)
        cmd = b""
    else:
        cmd = strip_oneshot(data)
    reply = await _run_handler(handler, cmd, peer)
    if reply:
        with trio.move_on_after(timeout):
            await _send_all(conn, reply)


async def _stream_conn(
    conn: socket.socket,
    handler: CommandHandler,
    peer: str,
    timeout: float,
    first: bytes | None = None,
) -> None:
    framer = LineFramer(CMD_BUFLEN)
    now_fn = getattr(handler, "handle_now", None)
    out: list[bytes] = []
    while True:
        # A controller waits for its reply before the next command: wait for
        # readiness first (a turn for the other tasks too) rather than try a
        # read that would fail.
        await trio.lowlevel.wait_readable(conn)
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            return
        for line in framer.feed(data):
            if line is None:
                log.warning(
                    "control connection from %s: line longer than %d bytes, closing",
                    peer,
                    CMD_BUFLEN - 1,
                )
                if out:
                    await _send_all(conn, b"".join(out))
                return
            handler.note_received()
            reply = _run_now(now_fn, line, peer) if now_fn is not None else None
            if reply is None:
                if out:  # what is answered goes out before a command that waits
                    await _send_all(conn, b"".join(out))
                    out.clear()
                reply = await _run_handler(handler, line, peer)
            if reply:
                out.append(reply)
        if out:  # one write for every line of this read, in order
            await _send_all(conn, b"".join(out))
            out.clear()


async def _serve_stdio(
    bound: BoundControl,
    handler: CommandHandler,
    task_status: trio.TaskStatus[None],
    on_eof: Callable[[], None] | None,
) -> None:
    assert bound.in_fd is not None and bound.out_fd is not None
    # own duplicates, so that closing the streams leaves bound's fds alone
    rstream = trio.lowlevel.FdStream(os.dup(bound.in_fd))
    wstream = trio.lowlevel.FdStream(os.dup(bound.out_fd))
    framer = LineFramer(CMD_BUFLEN)
    try:
        task_status.started()
        while True:
            try:
                data = await rstream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.error("can't read from control %s: %s", bound.spec, e)
                break
            if not data:
                log.debug("EOF on control %s", bound.spec)
                break
            stop = False
            for line in framer.feed(data):
                if line is None:
                    log.error(
                        "control %s: line longer than %d bytes, closing",
                        bound.spec,
                        CMD_BUFLEN - 1,
                    )
                    stop = True
                    break
                handler.note_received()
                reply = await _run_handler(handler, line, LOCAL_PEER)
                if reply:
                    try:
                        await wstream.send_all(reply)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                        log.error("can't write to control %s: %s", bound.spec, e)
                        stop = True
                        break
            if stop:
                break
    finally:
        rstream.close()
        wstream.close()
    if on_eof is not None:
        on_eof()
