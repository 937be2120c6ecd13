"""Calls that survive a restart: session state in SQLite or Redis (--state).

:class:`StateKeeper` is one Trio service (``server.services``):

* **restore** (at start, before the relay reports ready): every session the
  store holds for ``--state-node`` is reopened on the same ports, with its
  remotes, latch state, tags, TTL deadlines, notify target and recordings;
  sessions whose TTL ran out while the relay was down expire (with their
  timeout notification); a session whose port can't be bound again is
  logged and dropped.
* **write-behind with group commits**: the dispatcher calls
  :meth:`StateKeeper.changed` once per answered command (``on_answered``);
  the keeper snapshots the sessions of that Call-ID into a pending map
  (one entry per session: later changes overwrite earlier ones) and hands
  the dispatcher an awaitable the reply waits on.  One writer task commits
  whatever is pending in one transaction, in a worker thread, then wakes
  every reply it covered.  So a reply leaves only after its change is
  durable, and commands answered meanwhile share the next commit.
* **latches** come from the media thread through a bounded deque and an
  eventfd (the media thread never blocks and never waits for the store);
  past the bound a full re-sync is scheduled instead.
* **counters** (packets in/relayed/dropped, last arrival) are written
  lazily: with any other change of the session, and every FLUSH_EVERY
  seconds for sessions whose counters moved.
* **a store that is slow or gone** never holds the relay: a reply waits at
  most REPLY_WAIT for its commit, then leaves anyway (counted:
  ``unsaved_replies``); while the store is down replies do not wait at all;
  the writer retries with back-off and, once the store is back, rewrites the
  node's whole state (catch-up) in one commit.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ...sessions import snapshot as snap
from ...sessions.session import Session
from .store import StateError, Store, StoreDown, open_store

log = logging.getLogger("pyrtpproxy.state")

FLUSH_EVERY = 5.0  # s: lazy counter writes
REPLY_WAIT = 3.0  # s: longest a reply waits for its commit (Kamailio waits 5)
RETRY_MIN, RETRY_MAX = 0.1, 5.0  # s: back-off while the store is down
LATCH_QUEUE_MAX = 4096  # latch events waiting for the Trio side
# Tests only: SIGKILL the relay right after its N-th commit, before the
# replies that commit covered leave (the crash window the issue names).
_KILL_AFTER_COMMIT = int(os.environ.get("PYRTPPROXY_TEST_KILL_AFTER_COMMIT", "0") or 0)

__all__ = ["StateError", "StateKeeper", "attach"]


@attrs.define
class StateStats:
    commits: int = 0
    sessions_written: int = 0
    sessions_deleted: int = 0
    commit_errors: int = 0
    unsaved_replies: int = 0
    latch_events: int = 0
    latch_overflows: int = 0
    restored: int = 0
    restore_expired: int = 0
    restore_dropped: int = 0


class StateKeeper:
    def __init__(
        self, server: Any, store: Store, node: str, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.server = server
        self.d = server.dispatcher
        self.engine = server.engine
        self.store = store
        self.node = node
        self.clock = clock or self.d.clock
        self.stats = StateStats()
        self.pending: dict[str, Session | None] = {}  # key -> session to write (None: delete)
        self.known: dict[str, set[str]] = {}  # call_id -> keys in the store (or pending)
        self._seq = 0  # changes queued so far
        self._done = 0  # changes durable so far
        self._waiters: list[tuple[int, trio.Event]] = []
        self._wake: trio.Event | None = None
        self.down = False  # the last commit failed
        self._resync = False
        self._counts: dict[str, int] = {}  # key -> packets seen at the last write
        self._latch_q: collections.deque = collections.deque()
        self._latch_overflow = False
        self._latch_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    # ---- the dispatcher's side (Trio thread) ---------------------------------------
    def changed(self, cmd: Any) -> Callable[[], Awaitable[None]] | None:
        """One answered command: queue its sessions' new state; the returned
        coroutine function waits until that state is durable."""
        call_id = getattr(cmd, "call_id", None)
        if call_id is None:
            name = type(cmd).__name__
            if name != "DeleteAll":
                return None
            for cid in list(self.known):
                self._sync_call(cid)
        else:
            if type(cmd).__name__ == "Query" and not getattr(cmd, "subcommands", None):
                return None
            self._sync_call(call_id)
        return self._waiter()

    def _sync_call(self, call_id: str) -> None:
        live = self.d.table.by_callid.get(call_id, ())
        keys = self.known.get(call_id, set())
        now_m, now_w = self.clock(), time.time()
        seen = set()
        for s in live:
            k = snap.session_key(s.call_id, s.tag)
            seen.add(k)
            self._put(k, s, now_m, now_w)
        for k in keys - seen:
            self._queue(k, None)
        if seen:
            self.known[call_id] = seen
        else:
            self.known.pop(call_id, None)

    def _put(self, key: str, s: Session, now_m: float = 0.0, now_w: float = 0.0) -> None:
        # The snapshot itself is taken by the writer, after a media-engine
        # barrier: the jobs an answered command queued (prefill) have run.
        self._queue(key, s)

    def _encode(self, key: str, s: Session, now_m: float, now_w: float) -> bytes:
        self.engine.sync(s)
        self._counts[key] = _npkts(s)
        return snap.encode(snap.take(s, now_m, now_w, self._recs(s)))

    def _recs(self, s: Session) -> tuple[snap.RecSnap, ...]:
        rec = getattr(self.d, "recording", None)
        if rec is None:
            return ()
        out = []
        for name, streams in (("rtp", s.rtp), ("rtcp", s.rtcp)):
            for i, st in enumerate(streams):
                tap = rec.taps.get(st)
                sink = getattr(tap, "sink", None)
                if sink is not None and hasattr(sink, "single") and hasattr(sink, "name"):
                    out.append(snap.RecSnap(f"{name}{i}", sink.name, bool(sink.single)))
        return tuple(out)

    def _queue(self, key: str, data: Session | None) -> None:
        if data is None:
            self._counts.pop(key, None)
        self.pending[key] = data
        self._seq += 1
        if self._wake is not None:
            self._wake.set()

    def _waiter(self) -> Callable[[], Awaitable[None]]:
        target = self._seq

        async def wait() -> None:
            if self._done >= target or self.down or self._closed:
                if self.down:
                    self.stats.unsaved_replies += 1
                return
            ev = trio.Event()
            self._waiters.append((target, ev))
            with trio.move_on_after(REPLY_WAIT):
                await ev.wait()
            if self._done < target:
                self.stats.unsaved_replies += 1

        return wait

    def on_timeout(self, s: Session) -> None:
        """A session timed out (the expiry timer): delete it from the store."""
        k = snap.session_key(s.call_id, s.tag)
        keys = self.known.get(s.call_id)
        if keys is not None:
            keys.discard(k)
            if not keys:
                del self.known[s.call_id]
        self._queue(k, None)

    def statistics(self) -> dict[str, Any]:
        """The ``state`` section of /stats and /metrics."""
        d = attrs.asdict(self.stats)
        d.update(store_down=int(self.down), pending=len(self.pending), node=self.node)
        return d

    # ---- the media thread's side ----------------------------------------------------
    def on_latch(self, st: Any) -> None:
        """Media thread: a stream latched or re-latched.  Never blocks."""
        q = self._latch_q
        if len(q) >= LATCH_QUEUE_MAX:
            self._latch_overflow = True
        else:
            q.append(st.session)
        try:
            os.eventfd_write(self._latch_fd, 1)
        except OSError:  # pragma: no cover
            pass

    async def _latches(self) -> None:
        fd = self._latch_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            q = self._latch_q
            sessions = {}
            while q:
                s = q.popleft()
                sessions[id(s)] = s
            if self._latch_overflow:
                self._latch_overflow = False
                self.stats.latch_overflows += 1
                sessions = {id(s): s for s in self.d.table}
            now_m, now_w = self.clock(), time.time()
            for s in sessions.values():
                if s.deleted:
                    continue
                self.stats.latch_events += 1
                k = snap.session_key(s.call_id, s.tag)
                if k in self.known.get(s.call_id, ()):
                    self._put(k, s, now_m, now_w)

    # ---- the writer ---------------------------------------------------------------------
    async def _writer(self) -> None:
        delay = RETRY_MIN
        while True:
            if not self.pending and not self._resync:
                self._wake = trio.Event()
                await self._wake.wait()
            await self.engine.barrier()
            replace = self._resync
            if replace:
                self._full_snapshot()
            dirty, self.pending = self.pending, {}
            upto = self._seq
            batch = self._batch(dirty)
            try:
                await trio.to_thread.run_sync(
                    functools.partial(self.store.commit, self.node, batch, replace=replace)
                )
            except StoreDown as exc:
                self.stats.commit_errors += 1
                if not self.down:
                    log.error(
                        "state store %s: commit failed, relay goes on, retrying: %s", self.store.url, exc
                    )
                self.down = True
                self._resync = True
                self._wake_all()  # nobody waits on a dead store
                for k, v in dirty.items():
                    self.pending.setdefault(k, v)
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            if self.down:
                log.warning("state store %s is back: %d sessions written", self.store.url, len(batch))
            self.down = False
            self._resync = False
            delay = RETRY_MIN
            self.stats.commits += 1
            for v in batch.values():
                if v is None:
                    self.stats.sessions_deleted += 1
                else:
                    self.stats.sessions_written += 1
            self._done = upto
            if _KILL_AFTER_COMMIT and self.stats.commits == _KILL_AFTER_COMMIT:
                os.kill(os.getpid(), signal.SIGKILL)  # tests: die between the write and the reply
            self._wake_all()

    def _batch(self, dirty: dict[str, Session | None]) -> dict[str, bytes | None]:
        now_m, now_w = self.clock(), time.time()
        batch: dict[str, bytes | None] = {}
        for k, s in dirty.items():
            if s is None:
                batch[k] = None
            elif not s.deleted:  # (closed at shutdown: kept in the store)
                batch[k] = self._encode(k, s, now_m, now_w)
        return batch

    def _wake_all(self) -> None:
        keep = []
        for target, ev in self._waiters:
            if target <= self._done or self.down:
                ev.set()
            else:
                keep.append((target, ev))
        self._waiters = keep

    def _full_snapshot(self) -> None:
        """Catch-up after an outage, and the last write at shutdown: the
        node's whole state, from the table (the sessions rtpproxy commands
        made; --mediaproxy calls are not kept)."""
        self.pending = {}
        known: dict[str, set[str]] = {}
        for s in self.d.table:
            k = snap.session_key(s.call_id, s.tag)
            if k in self.known.get(s.call_id, ()):
                known.setdefault(s.call_id, set()).add(k)
                self._put(k, s)
        self.known = known

    async def _flusher(self) -> None:
        """Lazy counters: sessions whose packet counts moved, every FLUSH_EVERY s."""
        while True:
            await trio.sleep(FLUSH_EVERY)
            now_m, now_w = self.clock(), time.time()
            for s in list(self.d.table):
                k = snap.session_key(s.call_id, s.tag)
                if k not in self.known.get(s.call_id, ()):
                    continue
                self.engine.sync(s)
                if _npkts(s) != self._counts.get(k):
                    self._put(k, s, now_m, now_w)

    def final_flush(self) -> None:
        """At shutdown (before the sessions are closed): write the counters
        of every session synchronously, so a SIGTERM restart loses nothing."""
        if self._closed:
            return
        try:
            self._full_snapshot()
            dirty, self.pending = self.pending, {}
            self.store.commit(self.node, self._batch(dirty), replace=True)
        except StoreDown as exc:
            log.error("state store %s: final write failed: %s", self.store.url, exc)
        self._closed = True

    # ---- restore ----------------------------------------------------------------------------
    async def restore(self) -> None:
        rows = await trio.to_thread.run_sync(self.store.load, self.node)
        snaps = []
        for key, data in rows:
            try:
                sn = snap.decode(data)
            except snap.SchemaError as exc:
                raise StateError(f"--state {self.store.url}: session {key}: {exc}") from None
            snaps.append(sn)
        now_m, now_w = self.clock(), time.time()
        indep = self.d.table.independent
        gone: dict[str, bytes | None] = {}
        for sn in snaps:
            key = sn.key
            if sn.deadline(indep) <= now_w:
                s = snap.restore(sn, now_m, now_w, _iface)
                log.info(
                    "session on tag %s timed out while the relay was down", s.tag, extra={"callid": s.call_id}
                )
                self.stats.restore_expired += 1
                self.d.counters.nsess_timeout += 1
                self.d.on_timeout(s)
                gone[key] = None
                continue
            if not self._reopen(sn, now_m, now_w):
                self.stats.restore_dropped += 1
                gone[key] = None
                continue
            self.stats.restored += 1
            self.known.setdefault(sn.call_id, set()).add(key)
        if gone:
            self.pending.update(gone)
            self._seq += 1
        self.d.on_schedule()
        log.info(
            "state %s node %s: %d session(s) restored, %d expired, %d dropped",
            self.store.url,
            self.node,
            self.stats.restored,
            self.stats.restore_expired,
            self.stats.restore_dropped,
        )

    def _reopen(self, sn: snap.SessionSnap, now_m: float, now_w: float) -> bool:
        from ...media.engine import bind_pair
        from ...sessions.ports import PortTable

        d = self.d
        s = snap.restore(sn, now_m, now_w, _iface)
        bound: list[tuple[Any, Any, Any]] = []
        for idx in (0, 1):
            rtp = s.rtp[idx]
            if not rtp.port:
                continue
            try:
                pair = bind_pair(rtp.family, rtp.laddr, rtp.port, rtp.tos)
            except OSError as exc:
                log.error(
                    "can't bind port %d again (%s): session on tag %s dropped",
                    rtp.port,
                    exc,
                    s.tag,
                    extra={"callid": s.call_id},
                )
                for _st, a, b in bound:
                    a.close()
                    b.close()
                return False
            bound.append((rtp, pair[0], pair[1]))
        s.shard = self.engine.assign()
        for rtp, a, b in bound:
            table = d.ports.get(rtp.family)
            if table is None:
                sett = d.settings
                table = d.ports[rtp.family] = PortTable(
                    sett.port_min, sett.port_max, sequential=sett.sequential
                )
            table.in_use[rtp.port] += 1  # (a Counter: ports may be shared)
            for st, sock in ((rtp, a), (rtp.rtcp_twin, b)):
                st.sock = sock
                st.fd = sock.fileno()
                st.port = rtp.port if st is rtp else rtp.port + 1
                st.family = rtp.family
                st.active = s.complete
        d.table.add(s)
        d.counters.nsess_created += 1
        if s.complete:
            d.counters.nsess_complete += 1
        for st in s.streams():
            if st.sock is not None:
                self.engine.add(st)
        rec = getattr(d, "recording", None)
        if rec is not None and sn.recs and hasattr(rec, "resume"):
            for r in sn.recs:
                kind, i = r.key[:-1], int(r.key[-1])
                st = (s.rtp if kind == "rtp" else s.rtcp)[i]
                if not rec.resume(s, st, r.name, r.single):
                    log.error("recording %s could not be resumed", r.name, extra={"callid": s.call_id})
        log.info(
            "session on tag %s restored, RTP ports %d/%d",
            s.tag,
            s.rtp[0].port,
            s.rtp[1].port,
            extra={"callid": s.call_id},
        )
        return True

    # ---- the service ---------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        prev = None
        try:
            async with trio.open_nursery() as nursery:
                await self.restore()
                if hasattr(self.engine, "on_latch"):
                    prev = self.engine.on_latch  # --kernel's, if any
                    mine = self.on_latch
                    if prev is None:
                        self.engine.on_latch = mine
                    else:

                        def both(st: Any) -> None:
                            prev(st)
                            mine(st)

                        self.engine.on_latch = both
                nursery.start_soon(self._writer)
                nursery.start_soon(self._latches)
                nursery.start_soon(self._flusher)
                if self.pending:
                    self._wake = trio.Event()
                    self._wake.set()
                task_status.started()
        finally:
            if prev is not None or hasattr(self.engine, "on_latch"):
                self.engine.on_latch = prev

    def close(self) -> None:
        self._closed = True
        try:
            self.store.close()
        finally:
            try:
                os.close(self._latch_fd)
            except OSError:  # pragma: no cover
                pass


def _npkts(s: Session) -> int:
    return sum(st.npkts_in + st.ndropped for st in s.streams())


def _iface(i: snap.IfaceSnap) -> Any:
    from ..dispatcher import Iface

    return Iface(i.family, i.addr, i.adv, i.label)


def default_node() -> str:
    return socket.gethostname()


def attach(server: Any, cfg: Any) -> StateKeeper | None:
    """--state URL [--state-node ID]: restore at start, write as calls change."""
    url = getattr(cfg, "state", None)
    if not url:
        return None
    store = open_store(url)
    store.open()  # StateError: a clear message and exit 1, before anything is served
    keeper = StateKeeper(server, store, getattr(cfg, "state_node", None) or default_node())
    d = server.dispatcher
    prev_timeout = d.on_timeout

    def on_timeout(s: Session) -> None:
        keeper.on_timeout(s)
        prev_timeout(s)

    d.on_timeout = on_timeout
    d.on_answered = keeper.changed
    d.defers_replies = True
    server.services.append(keeper.run)
    server.before_close.append(keeper.final_flush)
    server.closers.append(keeper.close)
    server.state = keeper
    server.__dict__.setdefault("stats_sections", {})["state"] = keeper.statistics
    return keeper
