"""The media engine: one thread, one ``select.epoll``, every media socket.

The control plane (Trio) binds media sockets, registers them with the epoll
set and closes them (epoll_ctl and close are thread-safe, and closing at once
frees the port for the next allocation).  Every change to a stream's relay
state goes through a command queue (a deque of callables) and an eventfd
that wakes the loop; the loop runs queued work before it looks at any packet
of the same wake-up, so a U/L that was answered is always in force for the
packets that follow it.  ``post`` spares the round trip while the loop is
idle: the job then runs in the caller's thread, under a lock the loop takes
before it touches a batch.

Per packet the loop does: ``recvfrom_into`` a preallocated buffer, a dict
lookup from fd to its Stream, the latch fast path (source equals the latched
remote), ``sendto`` out of the peer stream's socket, and integer counters.
No objects are made per packet on the fast path except the slice view for
sendto.  Each socket is drained at most ``BURST`` packets per wake-up, and
only one when many sockets are ready at once (epoll is level-triggered, so
the rest comes in the next round), so one flooded port cannot starve the
others; the kernel's socket buffer is the only queue, and what overflows it
is dropped by the kernel.

Streams of sessions that asked for more (RTP analysis, ``Z``
re-packetisation, ``&& C`` forks: a ``Stream.hook``) live in a second table
and are served by ``_serve_slow``, which runs the same receive and latch
steps and hands each packet to the hook (media/streamhook.py).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..sessions import latch as _latch
from ..sessions.session import Stream

log = logging.getLogger("pyrtpproxy.media")

BURST = 64
#: From this many ready fds per epoll_wait on, each gets one read per round.
BUSY_EVENTS = 8
BURST_RANGE = range(BURST)
ONE = range(1)
RCVBUF = 256 * 1024

_EPOLLIN = select.EPOLLIN


def bind_pair(
    family: int, addr: str | None, port: int, tos: int | None
) -> tuple[socket.socket, socket.socket]:
    """Bind RTP on ``port`` and RTCP on ``port + 1``; both or neither."""
    socks = []
    try:
        for p in (port, port + 1):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            except OSError:
                pass
            if tos is not None and family == socket.AF_INET:
                try:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
                except OSError:
                    pass
            host = addr if addr is not None else ("::" if family == socket.AF_INET6 else "0.0.0.0")
            s.bind((host, p))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks[0], socks[1]


def _log_latch(st: Stream, before: int) -> None:
    who = "caller" if st.index == 1 else "callee"
    what = "re-latched" if before else "latched in"
    ssrc = "" if st.is_rtcp or st.ssrc is None else ", SSRC=0x%08X, Seq=%d" % (st.ssrc, st.seq)
    log.info(
        "%s's address %s: %s:%d (%s)%s",
        who,
        what,
        st.remote[0],
        st.remote[1],
        "RTCP" if st.is_rtcp else "RTP",
        ssrc,
        extra={"callid": st.session.call_id},
    )


class MediaEngine:
    """Relays RTP/RTCP between the streams it is given, in its own thread."""

    def __init__(
        self,
        *,
        dup_small: bool = False,
        clock: Callable[[], float] = time.monotonic,
        policy: _latch.Policy = _latch.DEFAULT_POLICY,
    ) -> None:
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, _EPOLLIN)
        self._q: collections.deque = collections.deque()
        self._streams: dict[int, Stream] = {}
        # Streams with a slow path (Stream.hook: analysis, Z, forks) are kept
        # apart and served by _serve_slow, so the fast loop never tests for it.
        self._slow: dict[int, Stream] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        # True while the loop is between epoll_wait calls (handling a batch);
        # set and read under _idle (see post()).
        self._busy = False
        self._idle = threading.Lock()
        self._dup_small = dup_small
        self._clock = clock
        # Endpoint learning: the latch decision for packets off the fast path.
        self.policy = policy
        # Totals of streams already removed (live ones are summed on read).
        self.gone_rcvd = 0
        self.gone_relayed = 0
        self.gone_dropped = 0
        self.npkts_foreign = 0  # dropped by the latch rules (strangers)
        self.npkts_inactive = 0  # arrived before the session was complete
        self.errors = 0
        # The re-packetiser's counters (streams with a Z, see streamhook).
        self.npkts_resizer_in = 0
        self.npkts_resizer_out = 0
        self.npkts_resizer_discard = 0
        # Non-media fds served by the loop (a worker's control socket):
        # fd -> callable run when it is readable.
        self.others: dict[int, Callable[[], None]] = {}
        # Called with each batch's events after the batch (a worker
        # publishes its counters there); None in the usual in-thread engine.
        self.after_batch: Callable[[list], None] | None = None
        # Called with a stream whose latch changed (the kernel path follows
        # it); only on the slow path, never per packet.
        self.on_latch: Callable[[Stream], None] | None = None

    # ---- control-plane side ---------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pyrtpproxy-media", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the media thread, before the next packet."""
        self._q.append((fn, args))
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:  # pragma: no cover - counter overflow cannot happen here
            pass

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like :meth:`call`, without a thread round trip when the loop is idle.

        While the loop is blocked in epoll_wait (not handling a batch) the
        job runs right here, after anything still queued, under a lock the
        loop takes before it looks at a batch: the loop cannot touch a
        packet until the job is done, which is what :meth:`call` promises,
        and a U/L on a quiet relay costs no eventfd write, no wake-up of
        the media thread and no GIL hand-off.  While the loop is busy with
        a batch the job is queued and the eventfd written, as by :meth:`call`.
        """
        if self._thread is not None:
            with self._idle:
                if not self._busy:
                    if self._q:
                        self._drain_queue()
                    try:
                        fn(*args)
                    except Exception:  # as in the media thread: log, count, go on
                        self.errors += 1
                        log.exception("media engine job failed")
                    return
        self.call(fn, *args)

    async def barrier(self) -> None:
        """Wait until everything queued so far has run."""
        import trio

        if self._thread is None or not self._thread.is_alive():
            self._drain_queue()
            return
        ev = threading.Event()
        self.call(ev.set)
        await trio.to_thread.run_sync(ev.wait)

    def stop(self) -> None:
        """Stop the thread and close every socket it still owns."""
        self._stop = True
        self.call(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._drain_queue()
        for fd, st in list(self._streams.items()) + list(self._slow.items()):
            self._close(st, st.sock, fd, True)
        try:
            self._ep.close()
        finally:
            os.close(self._wake_fd)

    def add(self, st: Stream) -> None:
        """Start serving ``st``'s socket (epoll_ctl is thread-safe)."""
        self._add(st)

    def remove(self, st: Stream, *, final: bool = True) -> None:
        """Unregister and close ``st``'s current socket (in the media thread).

        ``final``: the stream is gone, its counters move into the totals;
        otherwise the stream lives on with another socket (the ``n``
        modifier) and keeps counting.
        """
        if st.sock is None:
            return
        # Done here, synchronously, so the port can be bound again at once.
        # The media thread may still hold the socket object from the current
        # batch: a closed Python socket has fileno -1, so at worst it gets
        # EBADF, never another socket's packets.
        self._close(st, st.sock, st.fd, final)

    def totals(self) -> tuple[int, int, int]:
        """(received, relayed, dropped) over every stream, live and gone."""
        r, f, d = self.gone_rcvd, self.gone_relayed, self.gone_dropped
        for st in list(self._streams.values()) + list(self._slow.values()):
            r += st.npkts_in
            f += st.nrelayed
            d += st.ndropped
        return r, f, d

    @property
    def nsockets(self) -> int:
        return len(self._streams) + len(self._slow)

    # The sharding interface (see shard.ShardedEngine); in-process: trivial.
    def assign(self) -> int | None:
        return None

    def release_session(self, shard: int | None) -> None:
        pass

    def sync(self, session: Any) -> None:
        pass

    async def localize(self, session: Any) -> None:
        pass

    # ---- media-thread side ------------------------------------------------
    def _add(self, st: Stream) -> None:
        if st.sock is None:
            return
        (self._streams if st.hook is None else self._slow)[st.fd] = st
        self._ep.register(st.fd, _EPOLLIN)

    def reclassify(self, st: Stream) -> None:
        """After ``st.hook`` changed (media thread): serve it on the right loop."""
        fd = st.fd
        if fd < 0:
            return
        src, dst = (self._streams, self._slow) if st.hook is not None else (self._slow, self._streams)
        if src.get(fd) is st:
            del src[fd]
            dst[fd] = st

    def _close(self, st: Stream, sock: Any, fd: int, final: bool) -> None:
        for d in (self._streams, self._slow):
            if d.get(fd) is st:
                del d[fd]
                try:
                    self._ep.unregister(fd)
                except (OSError, ValueError):
                    pass
        if final:
            self.gone_rcvd += st.npkts_in
            self.gone_relayed += st.nrelayed
            self.gone_dropped += st.ndropped
            st.npkts_in = st.nrelayed = st.ndropped = 0
        if st.sock is sock:
            st.sock = None
            st.fd = -1
        sock.close()

    def _drain_queue(self) -> None:
        q = self._q
        while q:
            fn, args = q.popleft()
            try:
                fn(*args)
            except Exception:  # never let one bad job stop the relay
                self.errors += 1
                log.exception("media engine job failed")

    def _admit(self, st: Stream, src: Any, buf: bytearray, n: int, now: float, accept: Any) -> bool:
        """A packet off the fast path (another source, or not latched yet): the
        latch rules decide; a refusal is counted, a (re-)latch logged and
        reported. Shared by the fast loop and the slow path."""
        nlatch = st.nlatch
        was_latched = st.latched
        if not accept(st, src, buf, n, now):
            st.ndropped += 1
            st.hot = True  # a dropping socket is drained in bursts
            self.npkts_foreign += 1
            return False
        if st.nlatch != nlatch:
            _log_latch(st, nlatch)
        if self.on_latch is not None and (st.nlatch != nlatch or not was_latched):
            self.on_latch(st)
        return True

    def _hook_failed(self, st: Stream) -> None:
        self.errors += 1
        st.hook = None
        self.reclassify(st)
        log.exception("stream hook failed; the stream is relayed as it is")

    def _serve_slow(self, st: Stream, buf: bytearray, mv: memoryview, now: float, accept: Any) -> None:
        """One wake-up of a stream with a hook: the fast loop's receive and
        latch steps, then the hook (analysis, Z, forks) does the rest; after
        the burst, what the re-packetiser has ready goes out."""
        hook = st.hook
        sock = st.sock
        if hook is None or sock is None:  # changed meanwhile: not ours any more
            self.reclassify(st)
            return
        recv = sock.recvfrom_into
        try:
            for _ in range(BURST):
                try:
                    n, src = recv(buf)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                st.npkts_in += 1
                st.last_rx = now
                if not st.active:
                    st.ndropped += 1
                    self.npkts_inactive += 1
                    continue
                if src != st.remote or not st.latched:
                    if not self._admit(st, src, buf, n, now, accept):
                        continue
                elif not st.is_rtcp and n >= 12:
                    st.seq = (buf[2] << 8) | buf[3]
                hook(st, mv, n, src, now)
            hook.drain(st, now)
        except Exception:
            self._hook_failed(st)

    def _run(self) -> None:
        # A bug in one batch must not stop the relay: log, count, go on.
        while not self._stop:
            try:
                self._loop()
            except Exception:  # pragma: no cover - last resort, logged
                self.errors += 1
                log.exception("media engine error; relay continues")

    def add_other(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Serve a non-media fd from the loop (call before start)."""
        self.others[fd] = on_readable
        self._ep.register(fd, _EPOLLIN)

    def run_here(self) -> None:
        """Run the loop in the calling thread until stop (a worker process)."""
        self._run()

    def _loop(self) -> None:
        ep = self._ep
        streams = self._streams
        slow = self._slow
        wake_fd = self._wake_fd
        others = self.others
        after_batch = self.after_batch
        q = self._q
        buf = bytearray(65536)
        mv = memoryview(buf)
        clock = self._clock
        accept = self.policy.decider()
        dup_small = self._dup_small
        idle = self._idle
        while not self._stop:
            with idle:
                self._busy = False
            try:
                events = ep.poll(-1, 256)
            except InterruptedError:  # pragma: no cover
                continue
            # Not while post() runs a job in the control thread; from here to
            # the next poll, post() queues its jobs and writes the eventfd.
            with idle:
                self._busy = True
            # Reset the eventfd BEFORE running the queue: a job queued after
            # the drain then leaves the eventfd readable for the next poll.
            for fd, _ev in events:
                if fd == wake_fd:
                    try:
                        os.eventfd_read(wake_fd)
                    except OSError:
                        pass
                    break
            if q:
                self._drain_queue()
            now = clock()
            # Many sockets ready: one packet from each call stream, and epoll
            # (level-triggered) brings back the ones with more.  A drain loop
            # would end every socket's turn with a recvfrom that fails (EAGAIN,
            # an exception), which at 50 packets/s per stream costs as much as
            # the packet.  A socket whose last turn dropped a packet (a
            # stranger's, or before the session was complete) is drained in
            # bursts: under a flood its queue is emptied at once, leaving room
            # for the call's packets, instead of staying full.  Few sockets
            # ready: bursts for all, fewer epoll_waits.
            busy = len(events) >= BUSY_EVENTS
            for fd, _ev in events:
                st = streams.get(fd)
                if st is None:
                    st = slow.get(fd)
                    if st is not None:
                        self._serve_slow(st, buf, mv, now, accept)
                    elif fd in others:
                        others[fd]()
                    continue
                sock = st.sock
                recv = sock.recvfrom_into
                if busy and not st.hot:
                    burst = ONE
                else:
                    burst = BURST_RANGE
                    st.hot = False
                for _ in burst:
                    try:
                        n, src = recv(buf)
                    except BlockingIOError:
                        break
                    except OSError:
                        # ICMP errors surface here (ECONNREFUSED); ignore.
                        continue
                    st.npkts_in += 1
                    st.last_rx = now
                    if not st.active:
                        st.ndropped += 1
                        st.hot = True
                        self.npkts_inactive += 1
                        continue
                    if src != st.remote or not st.latched:
                        if not self._admit(st, src, buf, n, now, accept):
                            continue
                    elif not st.is_rtcp and n >= 12:
                        st.seq = (buf[2] << 8) | buf[3]
                    peer = st.peer
                    rec = st.rec
                    if rec is not None and not peer.muted:
                        # every accepted packet is recorded, relayed or not
                        try:
                            rec(bytes(mv[:n]), src, st)
                        except Exception:
                            self.errors += 1
                            st.rec = None
                            log.exception("recorder failed; recording stopped")
                    dst = peer.remote
                    if dst is None or peer.muted or peer.sock is None:
                        st.ndropped += 1
                        continue
                    # Counted before the send: whoever receives the packet
                    # (a test, or a controller's Q) already sees it counted.
                    st.nrelayed += 1
                    st.nbytes += n
                    try:
                        peer.sock.sendto(mv[:n], dst)
                        if dup_small and n < 128 and not st.is_rtcp:
                            peer.sock.sendto(mv[:n], dst)
                    except OSError as exc:
                        st.nrelayed -= 1
                        st.nbytes -= n
                        if exc.errno not in (
                            errno.EAGAIN,
                            errno.ENOBUFS,
                            errno.ECONNREFUSED,
                            errno.EPERM,
                            errno.EINVAL,
                            errno.ENETUNREACH,
                            errno.EHOSTUNREACH,
                            errno.EAFNOSUPPORT,
                        ):
                            self.errors += 1
                        st.ndropped += 1
                        continue
            if after_batch is not None:
                after_batch(events)
