"""Recording and copying media: R, C, N and ``-a`` (spec sections 3.10-3.12, 11).

Three threads take part, and each owns its part:

* the **control plane** (Trio) runs R/C/N: it matches streams, opens the files
  (``O_TRUNC``, mode 0666 minus the umask, through directory file descriptors
  and ``O_NOFOLLOW``, so a name can never leave ``-r``/``-S``), binds the
  source ports of remote copies, and keeps the book of which stream feeds
  which sink;
* the **media thread** calls a stream's ``rec`` hook after relaying a packet.
  For a file the hook only appends ``(channel, time.time(), source, packet,
  stream)`` to a bounded deque; past the bound the packet is dropped and
  counted, so a slow disk never stalls the relay.  For a remote copy
  (``C udp:host:port``) the hook sends the packet from the copy's own socket;
* one **writer thread** owns every open file: it builds the ad-hoc or pcap
  records, buffers them per file and writes them out (when a buffer reaches
  64 KiB, and every second), then closes files and renames them from the
  spool into ``-r`` when their recording ends.

Hooks are set and cleared by jobs run in the media thread (``engine.call``),
and a file is closed by a message the media thread itself queues after it
cleared the last hook feeding that file, so every packet handed to the writer
before the end is written before the file is closed.

A disk error stops that one recording (logged once, counted); the call goes
on.  On D, X, timeouts, N and shutdown (SIGTERM/SIGINT) files are flushed,
closed and moved out of the spool.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from ..formats import recfmt
from ..protocol.ecodes import ECode, RtppError
from ..sessions.session import Session, Stream

log = logging.getLogger("pyrtpproxy.recorder")

QUEUE_MAX_PKTS = 100_000  # packets waiting for the writer, at most ...
QUEUE_MAX_BYTES = 64 * 1024 * 1024  # ... and this many payload bytes
WAKE_AT = 256  # queued packets that wake the writer before its tick
TICK = 0.1  # s: the writer looks at its queue at least this often
FLUSH_EVERY = 1.0  # s: a buffered record reaches the file within this time
BUF_FLUSH = 64 * 1024  # bytes buffered per file before a write
JOIN_TIMEOUT = 30.0  # s: how long shutdown waits for the writer
YIELD_EVERY = 64  # records the writer builds before it lets other threads run
FILE_MODE = 0o666
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_file(name: str, dir_fd: int) -> int:
    """Create ``name`` in ``dir_fd`` afresh, replacing an older file of that name.

    rtpproxy truncates (O_TRUNC); unlinking first and creating with O_EXCL
    gives the same result for a regular file, but a symlink or hard link
    planted under that name is replaced instead of followed or truncated.
    """
    try:
        return os.open(name, _OPEN_FLAGS, FILE_MODE, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)
        return os.open(name, _OPEN_FLAGS, FILE_MODE, dir_fd=dir_fd)


@attrs.frozen
class RecOptions:
    """The recording part of the configuration."""

    record_dir: str | None = None  # -r
    spool_dir: str | None = None  # -S
    pcap: bool = False  # -P
    record_all: bool = False  # -a
    rtcp: bool = True  # not -R

    @classmethod
    def from_config(cls, cfg: Any) -> RecOptions:
        return cls(
            record_dir=getattr(cfg, "record_dir", None),
            spool_dir=getattr(cfg, "spool_dir", None),
            pcap=bool(getattr(cfg, "pcap", False)),
            record_all=bool(getattr(cfg, "record_all", False)),
            rtcp=not getattr(cfg, "no_rtcp_record", False),
        )


@attrs.frozen
class RecStats:
    files_opened: int
    files_closed: int
    files_open: int
    open_errors: int
    write_errors: int
    pkts_written: int
    pkts_dropped_queue: int  # the writer could not keep up
    pkts_lost_error: int  # arrived for a file that had failed
    copies_sent: int
    copy_errors: int


# ---- sinks -------------------------------------------------------------------------------
@attrs.define(eq=False)
class Channel:
    """One output file.  ``fd``, ``buf`` and the write counters belong to the
    writer thread once the channel is handed over; ``refs`` to the control plane."""

    name: str  # the file's name in its directory (already safe)
    fd: int
    spool: bool  # written in -S, renamed into -r at close
    pcap: bool
    single: bool  # rtpproxy's single-file mode (RTCP written as sent)
    label: str  # for logs
    dir_fd: int = -1  # where the file is (-S or -r)
    rdir_fd: int = -1  # where it goes at close when spooled (-r)
    buf: bytearray = attrs.Factory(bytearray)
    refs: int = 0
    npkts: int = 0
    nlost: int = 0
    failed: bool = False
    closed: bool = False
    dirty_since: float = 0.0


@attrs.define(eq=False)
class CopyPair:
    """The local port pair remote copies are sent from."""

    port: int
    family: int
    shown: str
    socks: list  # [rtp, rtcp]
    release: Callable[[int], None]
    live: int = 0  # sinks still using a socket of the pair


def _copy_port(text: str) -> int | None:
    """The port of a ``udp:host:port`` copy target (1..65534), or None."""
    if not text.isdigit() or not 0 < int(text) <= 65534:
        return None
    return int(text)


@attrs.define(eq=False)
class RemoteSink:
    sock: socket.socket
    pair: CopyPair
    refs: int = 0
    nsent: int = 0
    nerrors: int = 0


@attrs.define(eq=False)
class Tap:
    """What one stream's ``rec`` hook feeds."""

    stream: Stream
    sink: Any  # Channel | RemoteSink
    hook: Callable[..., None] = attrs.field(init=False)


# ---- the writer thread ----------------------------------------------------------------------
class Writer:
    """One thread that owns every open recording file."""

    def __init__(
        self,
        *,
        max_pkts: int = QUEUE_MAX_PKTS,
        max_bytes: int = QUEUE_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.q: collections.deque = collections.deque()
        self.ev = threading.Event()
        self.max_pkts = max_pkts
        self.max_bytes = max_bytes
        # enq_* are written by the media thread only, deq_* by the writer only.
        self.enq_n = self.enq_bytes = 0
        self.deq_n = self.deq_bytes = 0
        self.ndropped = 0  # media thread
        self.nwritten = 0
        self.nlost = 0
        self.nerrors = 0
        self.nclosed = 0
        self.ip_id = 0  # pcap IPv4 id, one counter for the process (as rtpproxy)
        self._clock = clock
        self._dirty: set[Channel] = set()
        self._local: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stopped = False

    # -- any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pyrtpproxy-recorder", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the writer thread after everything queued so far."""
        self.q.append((None, fn))
        self.ev.set()

    def stop(self, leftovers: list[Channel], timeout: float = JOIN_TIMEOUT) -> bool:
        """Write what is queued, close ``leftovers`` and every file, end the thread."""

        def finish() -> None:
            for ch in leftovers:
                self._close(ch)
            self._stopping = True

        if not self.running:
            if not self.stopped:
                # never started, or gone: do it here (nothing else writes now)
                self._drain()
                finish()
                self.stopped = True
            return True
        self.submit(finish)
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- media thread -----------------------------------------------------------
    def make_file_hook(self, ch: Channel) -> Callable[[bytes, tuple, Stream], None]:
        q = self.q
        ev = self.ev
        now = time.time
        wr = self

        def hook(data: bytes, src: tuple, st: Stream) -> None:
            if wr.enq_n - wr.deq_n >= wr.max_pkts or wr.enq_bytes - wr.deq_bytes >= wr.max_bytes:
                wr.ndropped += 1
                return
            q.append((ch, now(), src, data, st))
            wr.enq_n += 1
            wr.enq_bytes += len(data)
            if wr.enq_n - wr.deq_n >= WAKE_AT and not ev.is_set():
                ev.set()

        return hook

    # -- writer thread -----------------------------------------------------------
    def _run(self) -> None:
        last = self._clock()
        try:
            while True:
                self.ev.wait(TICK)
                self.ev.clear()
                self._drain()
                now = self._clock()
                if now - last >= FLUSH_EVERY:
                    last = now
                    self._flush_old(now - FLUSH_EVERY)
                if self._stopping and not self.q:
                    break
        except Exception:  # pragma: no cover - last resort
            log.exception("recording writer crashed")
        finally:
            self.stopped = True

    def _drain(self) -> None:
        q = self.q
        write = self._write
        n = 0
        while q:
            n += 1
            if not n % YIELD_EVERY:
                # Let the media thread have the GIL: it must not wait for a
                # long batch of ours (sleep(0) releases it).
                time.sleep(0)
            item = q.popleft()
            ch = item[0]
            if ch is None:
                try:
                    item[1]()
                except Exception:  # pragma: no cover - our own jobs
                    log.exception("recording job failed")
                continue
            self.deq_n += 1
            self.deq_bytes += len(item[3])
            write(ch, item[1], item[2], item[3], item[4])

    def _write(self, ch: Channel, t: float, src: tuple, data: bytes, st: Stream) -> None:
        if ch.fd < 0:
            ch.nlost += 1
            self.nlost += 1
            return
        try:
            if ch.pcap:
                hdr = self._pcap_header(ch, t, src, data, st)
            else:
                hdr = recfmt.adhoc_header(src, t, len(data))
        except (ValueError, OSError, OverflowError, IndexError, TypeError):
            ch.nlost += 1
            self.nlost += 1
            return
        buf = ch.buf
        if not buf:
            ch.dirty_since = self._clock()
            self._dirty.add(ch)
        buf += hdr
        buf += data
        ch.npkts += 1
        self.nwritten += 1
        if len(buf) >= BUF_FLUSH:
            self._flush(ch)

    def _pcap_header(self, ch: Channel, t: float, src: tuple, data: bytes, st: Stream) -> bytes:
        peer = st.peer
        if ch.single and st.is_rtcp and peer is not None and peer.port:
            # rtpproxy writes single-file RTCP as it leaves: from our socket
            # towards the other party.
            dst = peer.remote
            if dst is None:
                dst = ("::" if peer.family == socket.AF_INET6 else "0.0.0.0", 0)
            shost = peer.laddr
            if recfmt.is_wildcard(shost):
                shost = self._local_for(dst[0]) if not recfmt.is_wildcard(dst[0]) else dst[0]
            s, d = (shost, peer.port), dst
        else:
            dhost = st.laddr
            if recfmt.is_wildcard(dhost):
                dhost = self._local_for(src[0])
            s, d = src, (dhost, st.port)
        if recfmt.pack_addr(s[0])[0] != recfmt.pack_addr(d[0])[0]:
            s, d = src, (self._local_for(src[0]), st.port)  # bridged families: as received
        ip_id = self.ip_id
        self.ip_id = (ip_id + 1) & 0xFFFF
        return recfmt.pcap_header(s, d, t, data, ip_id)

    def _local_for(self, host: str) -> str:
        """The address the kernel would use towards ``host`` (for wildcard binds)."""
        local = self._local.get(host)
        if local is None:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    s.connect((host, 9))
                    local = s.getsockname()[0]
            except OSError:
                local = "::" if fam == socket.AF_INET6 else "0.0.0.0"
            if len(self._local) > 4096:
                self._local.clear()
            self._local[host] = local
        return local

    def _flush(self, ch: Channel) -> None:
        self._dirty.discard(ch)
        buf = ch.buf
        if not buf:
            return
        ch.buf = bytearray()
        if ch.fd < 0:
            return
        view = memoryview(buf)
        try:
            while view:
                n = os.write(ch.fd, view)
                view = view[n:]
        except OSError as exc:
            self._fail(ch, exc)
        finally:
            view.release()

    def _flush_old(self, before: float) -> None:
        for ch in [c for c in self._dirty if c.dirty_since <= before]:
            self._flush(ch)

    def _fail(self, ch: Channel, exc: OSError) -> None:
        self.nerrors += 1
        log.error(
            "error while recording %s: %s; this recording stops, the call goes on",
            ch.label,
            os.strerror(exc.errno) if exc.errno else exc,
        )
        ch.failed = True
        if ch.fd >= 0:
            try:
                os.close(ch.fd)
            except OSError:
                pass
        ch.fd = -1

    def _open_late(self, ch: Channel) -> None:
        try:
            ch.fd = create_file(ch.name, ch.dir_fd)
        except OSError as exc:
            ch.fd = -1
            ch.spool = False  # nothing to move
            self._fail(ch, exc)

    def _close(self, ch: Channel) -> None:
        """Flush, close, and move out of the spool (writer thread)."""
        if ch.closed:
            return
        self._flush(ch)
        if ch.fd >= 0:
            try:
                os.close(ch.fd)
            except OSError as exc:  # pragma: no cover - NFS-like errors
                self._fail(ch, exc)
            ch.fd = -1
        ch.closed = True
        self.nclosed += 1
        if ch.spool:
            try:
                os.rename(ch.name, ch.name, src_dir_fd=ch.dir_fd, dst_dir_fd=ch.rdir_fd)
            except OSError as exc:
                self.nerrors += 1
                log.error("can't move %s from the spool into the recording directory: %s", ch.label, exc)
        log.debug("recording %s closed: %d packets", ch.label, ch.npkts)


# ---- the recorder (control plane) -----------------------------------------------------------
class Recorder:
    """``dispatcher.recording``: R, C, N, -a and the file life cycle."""

    def __init__(self, dispatcher: Any, opts: RecOptions) -> None:
        self.dispatcher = dispatcher
        self.engine = dispatcher.engine
        self.opts = opts
        self.taps: dict[Stream, Tap] = {}
        self.channels: set[Channel] = set()  # files that recordings feed
        self.closing: set[Channel] = set()  # fed by nothing, not closed yet
        self.by_name: dict[str, Channel] = {}
        self.writer = Writer()
        self._dirfds: dict[str, int] = {}
        self._old_dirfds: list[int] = []  # replaced, kept until the writer ends
        self.files_opened = 0
        self.open_errors = 0
        self.copies_sent_gone = 0
        self.copy_errors_gone = 0
        self._closed = False

    # ---- directories --------------------------------------------------------------
    def _dir_fd(self, path: str) -> int:
        """An fd of directory ``path``, opened once (while still privileged,
        see app.run) and opened again if ``path`` now names another
        directory (an operator rotated it)."""
        fd = self._dirfds.get(path)
        if fd is not None:
            try:
                st = os.stat(path)
            except PermissionError:
                return fd  # after -u: the fd is what we have
            except OSError:
                st = None
            fst = os.fstat(fd)
            if st is not None and (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                return fd
            self._old_dirfds.append(fd)  # a channel may still use it
            del self._dirfds[path]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirfds[path] = fd
        return fd

    # ---- opening files ---------------------------------------------------------------
    def _open_channel(self, name: str, *, single: bool, label: str, append: bool = False) -> Channel | None:
        """Open (truncate) ``name`` in the spool or recording directory;
        ``append``: reopen the file a previous run was writing (--state)."""
        o = self.opts
        if o.record_dir is None:
            log.error("directory for saving local recordings is not configured")
            return None
        spool = o.spool_dir is not None
        old = self.by_name.get(name)
        if old is not None and old.refs > 0:
            # Another ;N session (or direction) writes this very file now:
            # share it rather than truncate it under the other writer.
            return old
        where = o.spool_dir if spool else o.record_dir
        try:
            recfmt.check_component(name)
            recfmt.resolve_in(where, name)
            rfd = self._dir_fd(o.record_dir)
            dfd = self._dir_fd(where)
            existed = False
            if append and old is None:
                fd, dfd, spool, existed = _reopen(name, dfd, rfd, spool)
            elif old is not None and not old.closed:
                # The previous file of that name is still being closed (and
                # moved out of the spool): open the new one after it, in order.
                fd = -2
            else:
                fd = create_file(name, dfd)
        except (OSError, ValueError) as exc:
            self.open_errors += 1
            log.error("can't open file %s for writing: %s", label, exc)
            return None
        ch = Channel(
            name=name, fd=fd, spool=spool, pcap=o.pcap, single=single, label=label, dir_fd=dfd, rdir_fd=rfd
        )
        if o.pcap and not existed:
            ch.buf += recfmt.pcap_file_header()
        if not self.writer.running and not self._closed:
            self.writer.start()
        if fd == -2:
            self.writer.submit(lambda: self.writer._open_late(ch))
        self.channels.add(ch)
        self.by_name[name] = ch
        self.files_opened += 1
        return ch

    # ---- hooks ------------------------------------------------------------------------
    def _attach(self, st: Stream, sink: Any) -> Tap:
        tap = Tap(st, sink)
        if isinstance(sink, Channel):
            tap.hook = self.writer.make_file_hook(sink)
        else:
            tap.hook = _remote_hook(sink)
        sink.refs += 1
        self.taps[st] = tap
        self.engine.call(_set_hook, st, tap.hook)
        return tap

    def _detach(self, taps: list[Tap]) -> None:
        """Clear the hooks of ``taps``; close the sinks nothing feeds any more."""
        if not taps:
            return
        closing_files: list[Channel] = []
        closing_socks: list[socket.socket] = []
        for tap in taps:
            if self.taps.get(tap.stream) is tap:
                del self.taps[tap.stream]
            sink = tap.sink
            sink.refs -= 1
            if sink.refs > 0:
                continue
            if isinstance(sink, Channel):
                closing_files.append(sink)
                self.channels.discard(sink)
                self.closing.add(sink)
            else:
                closing_socks.append(sink.sock)
                self.copies_sent_gone += sink.nsent
                self.copy_errors_gone += sink.nerrors
                pair = sink.pair
                pair.live -= 1
                if pair.live == 0:
                    pair.release(pair.port)
        for ch in [c for c in self.closing if c.closed]:
            self.closing.discard(ch)
            if self.by_name.get(ch.name) is ch:
                del self.by_name[ch.name]
        writer = self.writer
        hooks = [(t.stream, t.hook) for t in taps]

        def job() -> None:  # media thread
            for st, hook in hooks:
                if st.rec is hook:
                    st.rec = None
            for s in closing_socks:
                s.close()
            if closing_files:
                writer.submit(lambda: [writer._close(c) for c in closing_files])

        self.engine.call(job)

    # ---- starting a recorder on one stream direction --------------------------------------
    def _start_file(self, s: Session, idx: int, name: str | None, single: bool) -> bool:
        """rtpproxy's handle_copy for a local file; True if the stream is recorded."""
        rtp, rtcp = s.rtp[idx], s.rtcp[idx]
        sfx = ".o" if idx else ".a"
        if single:
            if rtp in self.taps:
                return False
            other = self.taps.get(s.rtp[1 - idx])
            if other is not None and isinstance(other.sink, Channel):
                ch = other.sink
            else:
                if name is None:
                    fname = recfmt.session_file_name(s.call_id, s.tag, ".pcap")
                else:
                    fname = recfmt.file_name(name, "")
                ch = self._open_channel(fname, single=True, label=fname)
                if ch is None:
                    return False
                log.info("starting recording RTP session on port %d to %s", rtp.port, fname)
            self._attach(rtp, ch)
            if self.opts.rtcp and rtcp not in self.taps:
                self._attach(rtcp, ch)
            return True
        made: list[Tap] = []
        for st, kind in ((rtp, ".rtp"), (rtcp, ".rtcp")):
            if kind == ".rtcp" and not self.opts.rtcp:
                break
            if st in self.taps:
                continue
            if name is None:
                fname = recfmt.session_file_name(s.call_id, s.tag, sfx + kind)
            else:
                fname = recfmt.file_name(name, kind)
            ch = self._open_channel(fname, single=False, label=fname)
            if ch is None:
                self._detach(made)
                return False
            made.append(self._attach(st, ch))
            log.info("starting recording %s session on port %d to %s", kind[1:].upper(), st.port, fname)
        return True

    async def _start_remote(self, s: Session, idx: int, target: str) -> CopyPair | None:
        """``C udp:host:port``: copies of the party's packets, from a new port pair."""
        import trio

        host, sep, port_s = target[4:].rpartition(":")
        if not sep or not host:
            log.error("remote recording target specification should include port number")
            return None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        # rtpproxy checks the port only when the copy is created (a stream
        # already copied takes any port text); until then it is 0 here.
        port = _copy_port(port_s) or 0
        try:
            # rtpproxy resolves the target as IPv4 only (local4remote with
            # AF_INET): an IPv6 target fails (E65).
            infos = await trio.socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            log.error("can't resolve the remote recording target %s: %s", host, exc)
            return None
        fams = {socket.AF_INET: None, socket.AF_INET6: None}
        for fam, *_rest, addr in infos:
            if fam in fams and fams[fam] is None:
                fams[fam] = addr
        d = self.dispatcher
        for fam in (socket.AF_INET, socket.AF_INET6):
            addr = fams[fam]
            table = d.ports.get(fam)
            if addr is None or table is None:
                continue
            return self._bind_pair(fam, addr[0], port, table)
        log.error("no local address of the family of %s", host)
        return None

    def _bind_pair(self, fam: int, rhost: str, rport: int, table: Any) -> CopyPair | None:
        from ..sessions.ports import PortsExhausted
        from .engine import bind_pair

        sett = self.dispatcher.settings
        # The configured address the kernel would send from towards the
        # target (bridging: the right side), else the first of the family.
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as probe:
                probe.connect((rhost, rport))
                towards = probe.getsockname()[0]
        except OSError:
            towards = None
        ours = [i for i in tuple(sett.ifaces) + tuple(sett.labelled) if i.family == fam]
        iface = next((i for i in ours if i.addr == towards), ours[0] if ours else None)
        laddr = iface.addr if iface is not None else None
        try:
            port, socks = table.allocate(lambda p: bind_pair(fam, laddr, p, sett.tos))
        except PortsExhausted:
            log.error("can't create listener for a remote copy")
            return None
        socks = list(socks)
        try:
            if rport:  # 0: the pair is closed again at once (see copy())
                socks[0].connect((rhost, rport))
                socks[1].connect((rhost, rport + 1))
        except OSError as exc:
            for x in socks:
                x.close()
            table.release(port)
            log.error("can't connect the remote copy socket: %s", exc)
            return None
        shown = (iface.shown if iface is not None else None) or socks[0].getsockname()[0]
        if recfmt.is_wildcard(shown):
            shown = socks[0].getsockname()[0]
        return CopyPair(port=port, family=fam, shown=shown, socks=socks, release=table.release)

    # ---- commands -----------------------------------------------------------------------
    async def record(self, cmd: Any, matches: list, now: float) -> str:
        single = bool(cmd.single and self.opts.pcap)
        n = 0
        for s, midx in matches:
            if self._start_file(s, 1 - midx, None, single):
                n += 1
        if n == 0:
            raise RtppError(ECode.SESUNKN)
        log.info("R %s %s %s: recording %d stream(s)", cmd.call_id, cmd.from_tag, cmd.to_tag or "", n)
        return "0"

    async def copy(self, cmd: Any, found: tuple, now: float) -> str:
        s, midx = found
        idx = 1 - midx
        target = cmd.target
        remote = target.startswith("udp:")
        if cmd.reply_port and not remote:
            log.error("C: the p modifier is only allowed with a udp: target")
            raise RtppError(ECode.CPYFAIL)
        if not remote:
            if not self._start_file(s, idx, target, bool(cmd.single and self.opts.pcap)):
                raise RtppError(ECode.CPYFAIL)
            return "0"
        pair = await self._start_remote(s, idx, target)
        if pair is None:
            raise RtppError(ECode.CPYFAIL)
        if s.rtp[idx] not in self.taps and _copy_port(target.rpartition(":")[2]) is None:
            log.error("invalid port in the remote recording target specification")
            for x in pair.socks:
                x.close()
            pair.release(pair.port)
            raise RtppError(ECode.CPYFAIL)
        if s.deleted:  # the session timed out while we resolved the name
            for x in pair.socks:
                x.close()
            pair.release(pair.port)
            raise RtppError(ECode.SESUNKN)
        rtp, rtcp = s.rtp[idx], s.rtcp[idx]
        # rtpproxy binds a new pair for every remote C; when the stream
        # already has a copy, the new pair is closed again at once, and Cp
        # still answers its port.
        reply = f"{pair.port} {pair.shown}" + (" 6" if pair.family == socket.AF_INET6 else "")
        used = [False, False]
        for i, st in enumerate((rtp, rtcp)):
            if i == 1 and not self.opts.rtcp:
                break
            if st in self.taps:
                continue
            pair.live += 1
            self._attach(st, RemoteSink(pair.socks[i], pair))
            used[i] = True
        for i in (0, 1):
            if not used[i]:
                pair.socks[i].close()
        if pair.live == 0:
            pair.release(pair.port)
        log.info("C %s: copying port %d to %s from port %d", cmd.call_id, rtp.port, target, pair.port)
        if cmd.reply_port:
            return reply
        return "0"

    async def norecord(self, cmd: Any, matches: list, now: float) -> str:
        n = 0
        for s, midx in matches:
            idx = 1 - midx
            if self._stop(s, idx):
                n += 1
            if cmd.all and self._stop(s, 1 - idx):
                n += 1
        if n == 0:
            raise RtppError(ECode.SESUNKN)
        return "0"

    def _stop(self, s: Session, idx: int) -> bool:
        tap = self.taps.get(s.rtp[idx])
        if tap is None:
            return False
        taps = [tap]
        t2 = self.taps.get(s.rtcp[idx])
        if t2 is not None:
            taps.append(t2)
        log.info("stopping recording RTP session on port %d", s.rtp[idx].port)
        self._detach(taps)
        return True

    def resume(self, s: Session, st: Stream, name: str, single: bool) -> bool:
        """--state restore: ``st`` feeds ``name`` again, appended to where a
        previous run of the relay left it (spool or recording directory)."""
        ch = self.by_name.get(name)
        if ch is None or ch.closed:
            ch = self._open_channel(name, single=single, label=name, append=True)
            if ch is None:
                return False
        self._attach(st, ch)
        return True

    def on_created(self, s: Session) -> None:
        """-a: record both directions of every new session."""
        single = self.opts.pcap
        for idx in (0, 1):
            self._start_file(s, idx, None, single)

    def session_gone(self, s: Session) -> None:
        taps = [t for t in (self.taps.get(st) for st in s.streams()) if t is not None]
        self._detach(taps)

    # ---- observation and shutdown ----------------------------------------------------------
    def statistics(self) -> RecStats:
        w = self.writer
        sent, errs = self.copies_sent_gone, self.copy_errors_gone
        for tap in list(self.taps.values()):
            if isinstance(tap.sink, RemoteSink):
                sent += tap.sink.nsent
                errs += tap.sink.nerrors
        return RecStats(
            files_opened=self.files_opened,
            files_closed=w.nclosed,
            files_open=self.files_opened - w.nclosed,
            open_errors=self.open_errors,
            write_errors=w.nerrors,
            pkts_written=w.nwritten,
            pkts_dropped_queue=w.ndropped,
            pkts_lost_error=w.nlost,
            copies_sent=sent,
            copy_errors=errs,
        )

    async def sync(self) -> None:
        """Wait until every packet relayed so far is written to its file, and
        every recording ended so far is closed (tests, operators' tools)."""
        import trio

        await self._engine_barrier()
        if not self.writer.running:
            return
        done = threading.Event()

        def job() -> None:
            for ch in list(self.writer._dirty):
                self.writer._flush(ch)
            done.set()

        self.writer.submit(job)
        await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)

    def _local_engine(self) -> Any:
        # Recorders only deal with the in-process engine (a sharded engine
        # localises recorded sessions first).
        return getattr(self.engine, "local", self.engine)

    async def _engine_barrier(self) -> None:
        """Wait until the media thread ran every job queued so far.

        The nudge (a second, empty job) guards against a wake-up of the
        media loop being lost; it costs nothing when the first one works.
        """
        import trio

        eng = self._local_engine()
        thread = getattr(eng, "_thread", None)
        if thread is None or not thread.is_alive():
            await eng.barrier()
            return
        ev = threading.Event()
        eng.call(ev.set)
        while not await trio.to_thread.run_sync(ev.wait, 0.25, abandon_on_cancel=True):
            eng.call(_noop)

    def close(self) -> None:
        """Server closer: every session is gone; write and close everything."""
        if self._closed:
            return
        self._closed = True
        self._detach(list(self.taps.values()))
        self._barrier_sync(5.0)
        leftovers = [c for c in self.channels | self.closing if not c.closed]
        self.channels.clear()
        self.closing.clear()
        if not self.writer.stop(leftovers):
            log.error("the recording writer did not finish within %.0f s", JOIN_TIMEOUT)
        for fd in list(self._dirfds.values()) + self._old_dirfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._dirfds.clear()
        self._old_dirfds.clear()

    def _barrier_sync(self, timeout: float) -> bool:
        eng = self._local_engine()
        thread = getattr(eng, "_thread", None)
        if thread is None or not thread.is_alive():
            return False
        ev = threading.Event()
        eng.call(ev.set)
        deadline = time.monotonic() + timeout
        while not ev.wait(0.25):
            if time.monotonic() >= deadline:
                return False
            eng.call(_noop)
        return True


# ---- media-thread pieces -------------------------------------------------------------------
def _reopen(name: str, dfd: int, rfd: int, spool: bool) -> tuple[int, int, bool, bool]:
    """(fd, dir_fd, spool, existed): ``name`` opened for appending where it
    is (the spool first), or created afresh in ``dfd``."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    for d, sp in ((dfd, spool), (rfd, False)):
        try:
            fd = os.open(name, flags, dir_fd=d)
        except FileNotFoundError:
            continue
        existed = os.fstat(fd).st_size > 0
        return fd, d, sp, existed
    return create_file(name, dfd), dfd, spool, False


def _noop() -> None:
    pass


def _set_hook(st: Stream, hook: Callable[..., None]) -> None:
    st.rec = hook


def _remote_hook(sink: RemoteSink) -> Callable[[bytes, tuple, Stream], None]:
    send = sink.sock.send

    def hook(data: bytes, src: tuple, st: Stream) -> None:
        try:
            send(data)
            sink.nsent += 1
        except OSError:  # ECONNREFUSED from an earlier ICMP, ENOBUFS, ...
            sink.nerrors += 1

    return hook


# ---- wiring -----------------------------------------------------------------------------------
def attach(server: Any, cfg: Any) -> Recorder:
    """Install the recorder on ``server`` (app.attach_extensions)."""
    opts = cfg if isinstance(cfg, RecOptions) else RecOptions.from_config(cfg)
    d = server.dispatcher
    rec = Recorder(d, opts)
    d.recording = rec
    server.closers.append(rec.close)
    for path in (opts.record_dir, opts.spool_dir):
        if path is not None:
            try:
                rec._dir_fd(path)
            except OSError as exc:  # rtpproxy only finds out at R time; say it now
                log.warning("recording directory %s is not usable: %s", path, exc)
    if opts.record_all:
        d.on_created = rec.on_created
    return rec


__all__ = ["Channel", "RecOptions", "RecStats", "Recorder", "Writer", "attach"]
