"""Timeout notifications (``-n``): the tag plus ``\\n`` over a stream socket.

When a session that a U armed with a notify socket and tag times out (setup
or media timeout; never for D or X), the URL-decoded tag followed by ``\\n``
is written to that target.  rtpproxy is the client: the SIP server listens.

Design (protocol §5):

* one :class:`_Target` per destination: a bounded deque of pending messages
  and one Trio task owning a persistent connection (made on first use, kept
  open and reused; several notifications may share one read on the far end);
* :meth:`Notifier.on_timeout` only appends to the deque (never awaits), so a
  dead or slow listener can't hold up a command or a packet; when the deque
  is full the oldest message is dropped and counted;
* a failed connect or write closes the connection and retries the message
  (up to :data:`RETRIES` more times), with an exponential back-off between
  connection attempts; then the message is dropped, counted and logged;
* while idle, the task watches the connection, so a listener that went away
  (restart) is noticed before the next message is written into a dead
  socket;
* ``tcp:%%CC_SELF%%:PORT`` targets are made per controller host (the peer
  of the control socket, 127.0.0.1 for UNIX and non-IPv4 controllers, as
  rtpproxy does), at most :data:`MAX_DYNAMIC_TARGETS` of them.

Which U socket names match which ``-n`` entry: :func:`match_target`.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

log = logging.getLogger("pyrtpproxy")

CC_SELF = "%%CC_SELF%%"
#: Pending messages per target; beyond that the oldest is dropped.
QUEUE_MAX = 1024
#: Extra attempts for one message after the first failed one (rtpproxy: 3).
RETRIES = 3
CONNECT_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
#: %%CC_SELF%% targets made on demand (rtpproxy shares its 64 slots).
MAX_DYNAMIC_TARGETS = 64

__all__ = [
    "CC_SELF",
    "Notifier",
    "TargetSpec",
    "attach",
    "attach_notifier",
    "match_target",
    "parse_target",
]


@attrs.frozen
class TargetSpec:
    """One ``-n`` entry, parsed.  ``host == CC_SELF`` marks the wildcard."""

    text: str  # canonical form, as in Config.notify_targets
    kind: str  # "unix" or "tcp"
    path: str | None = None
    host: str | None = None
    port: int = 0

    @property
    def wildcard(self) -> bool:
        return self.kind == "tcp" and self.host == CC_SELF


def parse_target(text: str) -> TargetSpec:
    """Parse a (normalised) ``-n`` value; bare paths are taken as unix."""
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"bad notification target {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return TargetSpec(text=text, kind="tcp", host=host, port=int(port))
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        raise ValueError(f"bad notification target {text!r}")
    return TargetSpec(text="unix:" + path, kind="unix", path=path)


def match_target(sock: str, targets: Iterable[str]) -> str | None:
    """The ``-n`` entry a U's notify socket names, or None (rtpproxy's lookup).

    * exact text match (``unix:/p``, ``tcp:h:p``, ``tcp:%%CC_SELF%%:p``);
    * a name with no ``:`` is a 1.x/2.0-style bare path: it matches
      ``unix:<name>``;
    * extension (field notes, OpenSIPS#1043): a bare ``host:port`` matches a
      configured ``tcp:host:port``.  Only listed targets are ever contacted.
    """
    targets = tuple(targets)
    if sock in targets:
        return sock
    if ":" not in sock:
        cand = "unix:" + sock
        return cand if cand in targets else None
    head = sock.split(":", 1)[0]
    if head not in ("unix", "tcp", "fd"):
        cand = "tcp:" + sock
        if cand in targets:
            return cand
    return None


def _cc_self_host(peer_host: str | None) -> str:
    """rtpproxy answers %%CC_SELF%% with the IPv4 peer, else 127.0.0.1."""
    if peer_host:
        try:
            if ipaddress.ip_address(peer_host).version == 4:
                return peer_host
        except ValueError:
            pass
    return "127.0.0.1"


@attrs.define(eq=False)
class _Target:
    key: str  # "unix:/path" or "tcp:host:port" (wildcard resolved)
    kind: str
    path: str | None
    host: str | None
    port: int
    queue: collections.deque = attrs.field(factory=collections.deque)
    wake: trio.Event = attrs.field(factory=trio.Event)
    current: bytes | None = None  # the message being delivered
    stream: Any = None
    backoff: float = 0.0
    down: bool = False  # an outage was logged
    running: bool = False
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    failures: int = 0

    def close_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.socket.close()
            except Exception:  # pragma: no cover
                pass
            self.stream = None


class Notifier:
    """Queues and delivers timeout notifications for a set of ``-n`` targets."""

    def __init__(
        self,
        targets: Iterable[str],
        *,
        queue_max: int = QUEUE_MAX,
        retries: int = RETRIES,
        connect_timeout: float = CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.specs: dict[str, TargetSpec] = {}
        for t in targets:
            spec = parse_target(t)
            self.specs[spec.text] = spec
        self.queue_max = max(1, queue_max)
        self.retries = retries
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.targets: dict[str, _Target] = {}
        self._ndynamic = 0
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        # counters (metrics / G-style)
        self.queued = 0  # accepted into a queue
        self.sent = 0  # written to a connection
        self.dropped = 0  # queue overflow, undeliverable or no target

    # ---- counters ---------------------------------------------------------------
    @property
    def pending(self) -> int:
        return sum(len(t.queue) + (t.current is not None) for t in self.targets.values())

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "sent": self.sent,
            "dropped": self.dropped,
            "pending": self.pending,
            "targets": len(self.targets),
        }

    def _bump(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    async def wait_for(self, pred: Callable[[], bool]) -> None:
        """Wait until ``pred()`` holds (checked after every delivery event)."""
        while not pred():
            await self._changed.wait()

    # ---- the command side: never blocks ----------------------------------------------
    def on_timeout(self, session: Any) -> None:
        """Dispatcher hook: queue ``session``'s notification if it has one."""
        sock = getattr(session, "notify_socket", None)
        tag = getattr(session, "notify_tag", None)
        if sock is None or tag is None:
            return
        data = tag.encode("utf-8", "surrogateescape") + b"\n"
        self.enqueue(sock, data, getattr(session, "notify_host", None))

    def enqueue(self, sock: str, data: bytes, peer_host: str | None = None) -> bool:
        name = match_target(sock, self.specs)
        if name is None:
            log.error("timeout notification: invalid socket name %s", sock)
            self.dropped += 1
            return False
        target = self._target(self.specs[name], peer_host)
        if target is None or self._nursery is None:
            self.dropped += 1
            log.error("timeout notification for %s dropped: notifier not running or too many targets", sock)
            return False
        q = target.queue
        if len(q) >= self.queue_max:
            q.popleft()
            target.dropped += 1
            self.dropped += 1
            if target.dropped == 1 or target.dropped % 100 == 0:
                log.error(
                    "timeout notification queue for %s is full: dropped %d so far", target.key, target.dropped
                )
        q.append(data)
        self.queued += 1
        if not target.running:
            target.running = True
            self._nursery.start_soon(self._run_target, target)
        target.wake.set()
        return True

    def _target(self, spec: TargetSpec, peer_host: str | None) -> _Target | None:
        if spec.wildcard:
            host = _cc_self_host(peer_host)
            key = f"tcp:{host}:{spec.port}"
        else:
            host = spec.host
            key = spec.text
        t = self.targets.get(key)
        if t is None:
            if spec.wildcard:
                if self._ndynamic >= MAX_DYNAMIC_TARGETS:
                    return None
                self._ndynamic += 1
            t = self.targets[key] = _Target(key, spec.kind, spec.path, host, spec.port)
        return t

    # ---- the service -----------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for t in self.targets.values():
                t.close_stream()
                t.running = False

    async def _connect(self, t: _Target) -> Any:
        with trio.fail_after(self.connect_timeout):
            if t.kind == "unix":
                return await trio.open_unix_socket(t.path)
            return await trio.open_tcp_stream(t.host, t.port)

    async def _run_target(self, t: _Target) -> None:
        attempts = 0  # failed attempts for the message in flight
        while True:
            if t.current is None:
                if not t.queue:
                    t.wake = trio.Event()
                    if t.stream is not None:
                        async with trio.open_nursery() as n:
                            n.start_soon(self._watch_eof, t)
                            await t.wake.wait()
                            n.cancel_scope.cancel()
                    else:
                        await t.wake.wait()
                    continue
                t.current = t.queue.popleft()
                attempts = 0
            if t.stream is None:
                if t.backoff:
                    await trio.sleep(t.backoff)
                try:
                    t.stream = await self._connect(t)
                except (OSError, trio.TooSlowError) as exc:
                    t.failures += 1
                    t.backoff = min(self.backoff_max, max(self.backoff_min, t.backoff * 2))
                    msg = _why(exc)
                    if not t.down:
                        t.down = True
                        log.error("can't connect to timeout notification socket %s: %s", t.key, msg)
                    else:
                        log.debug("can't connect to timeout notification socket %s: %s", t.key, msg)
                    attempts += 1
                    if attempts > self.retries:
                        self._give_up(t)
                    self._bump()
                    continue
                t.connects += 1
                if t.down:
                    log.info("timeout notification socket %s is reachable again", t.key)
                    t.down = False
                else:
                    log.debug("connected timeout notification socket %s", t.key)
            try:
                with trio.fail_after(self.write_timeout):
                    await t.stream.send_all(t.current)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                t.failures += 1
                log.error("failed to send timeout notification to %s: %s", t.key, _why(exc))
                t.close_stream()
                attempts += 1
                if attempts > self.retries:
                    self._give_up(t)
                self._bump()
                continue
            t.current = None
            t.backoff = 0.0
            t.sent += 1
            self.sent += 1
            self._bump()

    def _give_up(self, t: _Target) -> None:
        data, t.current = t.current, None
        if data is not None:
            t.dropped += 1
            self.dropped += 1
            log.error(
                "unable to send timeout notification %r to %s, dropped",
                data.rstrip(b"\n")[:80].decode("utf-8", "replace"),
                t.key,
            )

    async def _watch_eof(self, t: _Target) -> None:
        """While idle: read (and discard) from the connection to notice EOF."""
        stream = t.stream
        try:
            while True:
                if not await stream.receive_some(4096):
                    break
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if t.stream is stream:
            log.debug("timeout notification socket %s closed by the peer", t.key)
            t.close_stream()
            self._bump()


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---- wiring ----------------------------------------------------------------------
def attach_notifier(server: Any, targets: Iterable[str] | None = None, **kw: Any) -> Notifier | None:
    """Hook a :class:`Notifier` into ``server`` (dispatcher.on_timeout, a service).

    ``targets`` default to the dispatcher settings' ``notify_targets``.
    Sets ``server.notifier`` (read by the metrics listener).
    """
    d = server.dispatcher
    targets = tuple(d.settings.notify_targets if targets is None else targets)
    if not targets:
        return None
    n = Notifier(targets, **kw)
    prev = d.on_timeout

    def on_timeout(session: Any) -> None:
        prev(session)
        n.on_timeout(session)

    d.on_timeout = on_timeout
    server.services.append(n.run)
    server.notifier = n
    return n


def attach(server: Any, cfg: Any) -> Notifier | None:
    return attach_notifier(server, getattr(cfg, "notify_targets", ()) or ())
