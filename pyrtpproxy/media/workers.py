"""Media worker processes: shard sessions across cores.

One Python thread cannot relay on more than one core (the GIL), so with
``--workers N`` the relay starts N worker processes, each running the same
epoll loop as the in-process engine (:class:`MediaEngine`) over the sockets
of the sessions assigned to it.  The Trio control plane keeps the session
table, binds every socket and sends the worker a duplicate of the fd
(SCM_RIGHTS over a SOCK_SEQPACKET socketpair), together with the stream's
identity; state changes travel as pickled calls of the same module-level
jobs the in-process engine runs (``_apply_prefill``, ``_set_active``, ...),
with Stream arguments replaced by their ids.

Counters come back through shared memory (a memfd both processes map): per
stream slot, packets in / relayed / dropped and the last arrival time, which
the worker publishes after each epoll batch for the streams of that batch,
plus a header with the worker's totals.  The control plane reads them when
it needs them (Q, G, I, expiry), never per packet.

A session that needs more than relaying (recording, playback, copying) is
*localised* first: the worker hands back its streams' latch state and stops
serving them, and the in-process engine takes them over.  So recorders and
players only ever deal with the in-process engine.

Run as ``python -m pyrtpproxy.shard CTRL_FD SHM_FD NSLOTS``.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ..sessions import latch as _latch
from ..sessions.session import Stream
from .engine import MediaEngine

log = logging.getLogger("pyrtpproxy.shard")

HDR = 8  # header slots of the int64 array: the worker's totals
H_RCVD, H_RELAYED, H_DROPPED, H_FOREIGN, H_INACTIVE, H_ERRORS, H_NSOCK = range(7)
NCNT = 4  # int64 counters per stream: in, relayed, dropped, bytes relayed
MSG_MAX = 1 << 16

# The state a worker hands back when a stream is localised.
_STATE = (
    "remote",
    "latched",
    "untrusted",
    "asymmetric",
    "on_hold",
    "last_update",
    "ssrc",
    "seq",
    "nlatch",
    "sdp",
    "learn_until",
    "cand",
    "cand_rank",
    "active",
    "muted",
    "tos",
)


class Counters:
    """The shared counter block, mapped by the control plane and one worker."""

    def __init__(self, fd: int, nslots: int) -> None:
        self.nslots = nslots
        isize = (HDR + nslots * NCNT) * 8
        self.size = isize + nslots * 8
        self.map = mmap.mmap(fd, self.size)
        mv = memoryview(self.map)
        self.ints = mv[:isize].cast("q")
        self.times = mv[isize : self.size].cast("d")

    @staticmethod
    def create(nslots: int) -> tuple[int, Counters]:
        fd = os.memfd_create("pyrtpproxy-counters", 0)
        size = (HDR + nslots * NCNT) * 8 + nslots * 8
        os.ftruncate(fd, size)
        return fd, Counters(fd, nslots)

    def close(self) -> None:
        try:
            self.ints.release()
            self.times.release()
            self.map.close()
        except (BufferError, ValueError):  # pragma: no cover - views still in use
            pass


# ---- the worker process ---------------------------------------------------------
class _WSession:
    """What a worker knows of a session: its Call-ID, for log lines."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id


class Worker:
    def __init__(
        self, ctrl: socket.socket, cnt: Counters, policy: _latch.Policy = _latch.DEFAULT_POLICY
    ) -> None:
        self.ctrl = ctrl
        self.cnt = cnt
        self.engine = MediaEngine(policy=policy)
        self.by_sid: dict[int, Stream] = {}
        self.engine.add_other(ctrl.fileno(), self._on_ctrl)
        self.engine.after_batch = self._publish

    def run(self) -> None:
        self.engine.run_here()
        self.engine.stop()

    # counters
    def _publish_stream(self, st: Stream) -> None:
        b = HDR + st.slot * NCNT
        ints = self.cnt.ints
        ints[b] = st.npkts_in
        ints[b + 1] = st.nrelayed
        ints[b + 2] = st.ndropped
        ints[b + 3] = st.nbytes
        self.cnt.times[st.slot] = st.last_rx

    def _publish(self, events: list) -> None:
        streams = self.engine._streams
        for fd, _ in events:
            st = streams.get(fd)
            if st is not None and st.slot >= 0:
                self._publish_stream(st)
        e = self.engine
        ints = self.cnt.ints
        ints[H_FOREIGN] = e.npkts_foreign
        ints[H_INACTIVE] = e.npkts_inactive
        ints[H_ERRORS] = e.errors
        ints[H_RCVD] = e.gone_rcvd
        ints[H_RELAYED] = e.gone_relayed
        ints[H_DROPPED] = e.gone_dropped
        ints[H_NSOCK] = len(streams)

    # control messages
    def _on_ctrl(self) -> None:
        for _ in range(64):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.ctrl, MSG_MAX, 4)
            except BlockingIOError:
                return
            except OSError:
                self.engine._stop = True
                return
            if not data:  # the control plane is gone
                self.engine._stop = True
                return
            try:
                self._handle(pickle.loads(data), fds)
            except Exception:
                self.engine.errors += 1
                log.exception("worker: bad control message")
                for fd in fds:
                    os.close(fd)

    def _resolve(self, a: Any) -> Any:
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "\0sid":
            return self.by_sid.get(a[1])
        return a

    def _handle(self, msg: tuple, fds: list[int]) -> None:
        op = msg[0]
        if op == "add":
            _, sid, slot, is_rtcp, index, call_id, peer_sid, twin_sid, family, port, state = msg
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            st = self.by_sid.get(sid)
            if st is not None:
                # a new port for a live stream (the n modifier): keep its state
                self.engine.remove(st, final=False)
                state = {}
            else:
                st = Stream(session=_WSession(call_id), index=index, is_rtcp=is_rtcp)
                self.by_sid[sid] = st
                peer = self.by_sid.get(peer_sid)
                if peer is not None:
                    st.peer, peer.peer = peer, st
                twin = self.by_sid.get(twin_sid)
                if twin is not None:
                    if is_rtcp:
                        twin.rtcp_twin = st
                    else:
                        st.rtcp_twin = twin
            st.sock, st.fd, st.sid, st.slot, st.family, st.port = sock, sock.fileno(), sid, slot, family, port
            for k, v in state.items():
                setattr(st, k, v)
            self._publish_stream(st)
            self.engine.add(st)
        elif op == "remove":
            st = self.by_sid.pop(msg[1], None)
            if st is not None:
                self._publish_stream(st)
                self.engine.remove(st)
                for o in (st.peer, st.rtcp_twin):
                    if o is not None and o.peer is st:
                        o.peer = None
        elif op == "call":
            _, modname, qual, args = msg
            mod = sys.modules.get(modname) or __import__(modname, fromlist=["_"])
            fn = mod
            for part in qual.split("."):
                fn = getattr(fn, part)
            fn(*(self._resolve(a) for a in args))
        elif op == "detach":
            _, token, sids = msg
            states = {}
            for sid in sids:
                st = self.by_sid.pop(sid, None)
                if st is None:
                    continue
                self._publish_stream(st)
                states[sid] = {k: getattr(st, k) for k in _STATE}
                states[sid].update(
                    npkts_in=st.npkts_in, nrelayed=st.nrelayed, ndropped=st.ndropped, last_rx=st.last_rx
                )
                # stop serving it; the control plane keeps its own fd
                self.engine.remove(st, final=False)
                st.npkts_in = st.nrelayed = st.ndropped = 0
            self._reply(("detached", token, states))
        elif op == "barrier":
            self._publish(list((st.fd, 0) for st in self.by_sid.values()))
            self._reply(("barrier", msg[1]))
        elif op == "stop":
            self.engine._stop = True

    def _reply(self, msg: tuple) -> None:
        try:
            self.ctrl.sendall(pickle.dumps(msg))
        except OSError:
            self.engine._stop = True


def worker_main(argv: list[str]) -> int:
    import signal

    # The control plane decides when a worker stops (a "stop" message, or
    # EOF on the control socket when it is gone); a terminal's ^C or a HUP
    # sent to the whole process group must not kill sessions under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctrl_fd, shm_fd, nslots = int(argv[0]), int(argv[1]), int(argv[2])
    policy = _latch.DEFAULT_POLICY
    if len(argv) >= 5:
        policy = _latch.Policy(learning=argv[3], strict=argv[4] == "1")
    ctrl = socket.socket(fileno=ctrl_fd)
    ctrl.setblocking(False)
    cnt = Counters(shm_fd, nslots)
    os.close(shm_fd)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:worker %(process)d: %(message)s")
    Worker(ctrl, cnt, policy).run()
    return 0


# ---- the control plane's side -----------------------------------------------------
class WorkerHandle:
    """One worker process as the control plane sees it."""

    def __init__(self, index: int, nslots: int, policy: _latch.Policy = _latch.DEFAULT_POLICY) -> None:
        self.index = index
        self.nslots = nslots
        self.ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        shm_fd, self.cnt = Counters.create(nslots)
        self.free_slots = list(range(nslots - 1, -1, -1))
        self.used: set[int] = set()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyrtpproxy.media.workers",
                str(child.fileno()),
                str(shm_fd),
                str(nslots),
                policy.learning,
                "1" if policy.strict else "0",
            ],
            pass_fds=(child.fileno(), shm_fd),
            close_fds=True,
        )
        child.close()
        os.close(shm_fd)
        self.nsessions = 0
        self.dead = False
        self._lock = None
        self._tokens = itertools.count(1)

    @property
    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def send(self, msg: tuple, fds: tuple[int, ...] = ()) -> None:
        if self.dead:
            return
        data = pickle.dumps(msg)
        try:
            if fds:
                socket.send_fds(self.ctrl, [data], list(fds))
            else:
                self.ctrl.sendall(data)
        except OSError as exc:
            # The worker died: its sessions lose media until they end; new
            # sessions go elsewhere (see assign).
            self.dead = True
            log.error("media worker %d (pid %d) is gone: %s", self.index, self.proc.pid, exc)

    async def request(self, msg_for: Callable[[int], tuple], kind: str) -> tuple:
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            token = next(self._tokens)
            self.send(msg_for(token))
            with trio.fail_after(10):
                while True:
                    await trio.lowlevel.wait_readable(self.ctrl)
                    try:
                        data = self.ctrl.recv(MSG_MAX, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise OSError("media worker %d is gone" % self.index)
                    reply = pickle.loads(data)
                    if reply[0] == kind and reply[1] == token:
                        return reply

    def stop(self) -> None:
        try:
            self.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ctrl.close()
        self.cnt.close()


def _sid_arg(a: Any) -> Any:
    if isinstance(a, Stream):
        return ("\0sid", a.sid)
    return a


class ShardedEngine:
    """The MediaEngine interface over an in-process engine plus N workers.

    New sessions go to the worker with the fewest sessions; the in-process
    engine serves localised ones (recording, playback).
    """

    def __init__(
        self,
        workers: int,
        nslots: int,
        *,
        dup_small: bool = False,
        policy: _latch.Policy = _latch.DEFAULT_POLICY,
    ) -> None:
        self.local = MediaEngine(dup_small=dup_small, policy=policy)
        self.policy = policy
        self.nworkers = workers
        self.nslots = nslots
        self.workers: list[WorkerHandle] = []
        self._sids = itertools.count(1)
        self._owner: dict[int, WorkerHandle] = {}  # sid -> worker

    # lifecycle
    def start(self) -> None:
        self.local.start()
        for i in range(self.nworkers):
            self.workers.append(WorkerHandle(i, self.nslots, self.policy))

    def stop(self) -> None:
        self.local.stop()
        for w in self.workers:
            w.stop()
        self.workers = []

    # placement
    def assign(self) -> int | None:
        live = [w for w in self.workers if w.alive]
        if not live:
            return None  # relay in-process
        w = min(live, key=lambda w: w.nsessions)
        w.nsessions += 1
        return w.index

    def release_session(self, shard: int | None) -> None:
        if shard is not None and shard < len(self.workers):
            self.workers[shard].nsessions -= 1

    # streams
    def add(self, st: Stream) -> None:
        shard = getattr(st.session, "shard", None)
        if shard is None:
            self.local.add(st)
            return
        w = self.workers[shard]
        if st.sid not in self._owner:  # a new stream (else: a new port for it)
            if not w.free_slots:
                raise OSError("media worker %d has no free counter slot" % shard)
            st.sid = next(self._sids)
            st.slot = w.free_slots.pop()
            w.used.add(st.slot)
            self._owner[st.sid] = w
        peer = st.peer.sid if st.peer is not None else -1
        twin = st.session.rtp[st.index].sid if st.is_rtcp else st.rtcp_twin.sid
        state = {k: getattr(st, k) for k in _STATE}
        w.send(
            (
                "add",
                st.sid,
                st.slot,
                st.is_rtcp,
                st.index,
                st.session.call_id,
                peer,
                twin,
                st.family,
                st.port,
                state,
            ),
            (st.fd,),
        )

    def remove(self, st: Stream, *, final: bool = True) -> None:
        w = self._owner.get(st.sid)
        if w is None:
            self.local.remove(st, final=final)
            return
        sock = st.sock
        st.sock = None
        st.fd = -1
        if sock is not None:
            sock.close()  # our copy; the worker closes its own
        if not final:
            return  # the worker swaps the socket when add() sends the new one
        self.sync_stream(st, w)
        del self._owner[st.sid]
        w.send(("remove", st.sid))
        w.used.discard(st.slot)
        w.free_slots.append(st.slot)
        st.sid = st.slot = -1

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self._call(fn, args, self.local.call)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """:meth:`MediaEngine.post`: workers get a message either way."""
        self._call(fn, args, self.local.post)

    def _call(self, fn: Callable[..., Any], args: tuple, local: Callable[..., None]) -> None:
        for a in args:
            if not isinstance(a, Stream):
                continue
            w = self._owner.get(a.sid)
            if w is not None:
                w.send(("call", fn.__module__, fn.__qualname__, tuple(_sid_arg(x) for x in args)))
                return
            if getattr(a.session, "shard", None) is not None:
                # Not handed to its worker yet: nobody serves it, change it
                # here; add() sends the state along with the socket.
                fn(*args)
                return
            break
        local(fn, *args)

    async def barrier(self) -> None:
        await self.local.barrier()
        for w in self.workers:
            if w.alive:
                await w.request(lambda t: ("barrier", t), "barrier")

    # counters
    def sync_stream(self, st: Stream, w: WorkerHandle | None = None) -> None:
        w = w or self._owner.get(st.sid)
        if w is None or st.slot < 0:
            return
        b = HDR + st.slot * NCNT
        ints = w.cnt.ints
        st.npkts_in, st.nrelayed, st.ndropped, st.nbytes = ints[b], ints[b + 1], ints[b + 2], ints[b + 3]
        st.last_rx = w.cnt.times[st.slot]

    def sync(self, session: Any) -> None:
        if session.shard is None:
            return
        for st in session.streams():
            self.sync_stream(st)

    def totals(self) -> tuple[int, int, int]:
        """(received, relayed, dropped): in-process, workers' gone and live streams."""
        r, f, d = self.local.totals()
        for w in self.workers:
            ints = w.cnt.ints
            r += ints[H_RCVD]
            f += ints[H_RELAYED]
            d += ints[H_DROPPED]
            for slot in list(w.used):
                b = HDR + slot * NCNT
                r += ints[b]
                f += ints[b + 1]
                d += ints[b + 2]
        return r, f, d

    @property
    def nsockets(self) -> int:
        return self.local.nsockets + sum(w.cnt.ints[H_NSOCK] for w in self.workers)

    @property
    def errors(self) -> int:
        return self.local.errors + sum(w.cnt.ints[H_ERRORS] for w in self.workers)

    @property
    def npkts_foreign(self) -> int:
        return self.local.npkts_foreign + sum(w.cnt.ints[H_FOREIGN] for w in self.workers)

    # the slow path (streamhook) only runs in-process
    @property
    def npkts_resizer_in(self) -> int:
        return self.local.npkts_resizer_in

    @property
    def npkts_resizer_out(self) -> int:
        return self.local.npkts_resizer_out

    @property
    def npkts_resizer_discard(self) -> int:
        return self.local.npkts_resizer_discard

    @property
    def npkts_inactive(self) -> int:
        return self.local.npkts_inactive + sum(w.cnt.ints[H_INACTIVE] for w in self.workers)

    # localisation
    async def localize(self, session: Any) -> None:
        """Move ``session``'s streams from its worker into this process."""
        shard = session.shard
        if shard is None:
            return
        w = self.workers[shard]
        streams = [st for st in session.streams() if st.sid in self._owner]
        sids = [st.sid for st in streams]
        if w.alive:
            reply = await w.request(lambda t: ("detach", t, sids), "detached")
            states = reply[2]
        else:  # the worker died: take the sockets over with what we know
            states = {}
        session.shard = None
        w.nsessions -= 1
        for st in streams:
            state = states.get(st.sid, {})
            for k, v in state.items():
                setattr(st, k, v)
            del self._owner[st.sid]
            w.used.discard(st.slot)
            w.free_slots.append(st.slot)
            st.sid = st.slot = -1
            self.local.add(st)


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
