"""The kernel fast path (``--kernel``): nftables forwards latched streams.

Mechanism (chosen by measurement, see bench/RESULTS.md): stateless packet
rewriting in one nftables table of our own, ``inet pyrtpproxy``, driven
in-process through libnftables (ctypes; no subprocess per rule):

* ``prerouting`` (priority raw, before conntrack) looks up
  (local port, source address, source port) in the verdict map ``in4``; a
  hit jumps to that stream's chain, which rewrites destination address,
  destination port and source port to what the relay would have sent
  (the peer's remote, from the peer stream's local port), sets the DSCP the
  relay's socket uses, counts the packet in the stream's named counter and
  marks it ``notrack``.  The kernel then routes it out (forwarding).
* ``postrouting`` sets the source address to the relay's own (map ``src4``,
  keyed by the rewritten source port and destination): a local source
  address cannot be set before routing (it would be a martian).

No conntrack entry is made for forwarded packets, so there is none to
clean up: removing a map element stops the forwarding at once, and
deleting the table removes everything (at start, which cleans up after a
relay killed with -9, and at exit).  IPv6 has the same maps and chains
(``in6``, ``src6``) and is used when the host forwards IPv6.  Every other
packet (a stranger, the party from a new address, RTCP before it latches)
misses the map and
reaches the socket as before: latching stays in userspace, and the kernel
state follows it.

Rule changes run in one worker thread behind a per-session pending set
(bounded by the number of sessions), never in the media thread; the worker
also reads-and-resets the counters every ``poll`` seconds and books them in
the media thread (Q, G, I, metrics and the TTLs see the packets).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..sessions import kernel as K

log = logging.getLogger("pyrtpproxy.kernel")

TABLE = "pyrtpproxy"
POLL = 1.0
_NFT_CTX_OUTPUT_JSON = 1 << 4


class KernelError(Exception):
    """nftables refused a command (the message is nft's)."""


_LIB: Any = None


def _load() -> Any:
    global _LIB
    if _LIB is not None:
        return _LIB
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise KernelError(f"can't load libnftables ({exc}); install libnftables1") from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    _LIB = lib
    return lib


class Nft:
    """libnftables, in-process (ctypes).  One context; use from one thread at a time."""

    def __init__(self) -> None:
        lib = _load()
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise KernelError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self.ncmds = 0

    def run(self, cmd: str, *, as_json: bool = False) -> str:
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON if as_json else 0)
        rc = lib.nft_run_cmd_from_buffer(ctx, cmd.encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        self.ncmds += 1
        if rc != 0:
            raise KernelError(err.decode("utf-8", "replace").strip() or f"nft failed ({rc})")
        return out.decode("utf-8", "replace")

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def base_ruleset(table: str = TABLE) -> str:
    """Our table, replacing any table of that name a previous relay left."""
    return f"""add table inet {table}
delete table inet {table}
table inet {table} {{
  map in4 {{ type inet_service . ipv4_addr . inet_service : verdict; }}
  map src4 {{ type inet_service . ipv4_addr . inet_service : ipv4_addr; }}
  map in6 {{ type inet_service . ipv6_addr . inet_service : verdict; }}
  map src6 {{ type inet_service . ipv6_addr . inet_service : ipv6_addr; }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    udp dport . ip saddr . udp sport vmap @in4;
    udp dport . ip6 saddr . udp sport vmap @in6;
  }}
  chain post {{
    type filter hook postrouting priority 100; policy accept;
    ip saddr set udp sport . ip daddr . udp dport map @src4;
    ip6 saddr set udp sport . ip6 daddr . udp dport map @src6;
  }}
}}
"""


def _v6(f: K.Flow) -> bool:
    return f.family == socket.AF_INET6


def _addr(text: str, v6: bool = False) -> str:
    """Validated address text (never pass unchecked text into a ruleset)."""
    return str(ipaddress.IPv6Address(text) if v6 else ipaddress.IPv4Address(text))


def _names(f: K.Flow) -> tuple[str, str, str]:
    """(chain, counter, family tag) of a flow: per family, as the port tables are."""
    fam = "6" if _v6(f) else "4"
    p = int(f.lport)
    return f"s{fam}_{p}", f"c{fam}_{p}", fam


def install_cmds(f: K.Flow, saddr: str, old: K.Flow | None, table: str = TABLE) -> list[str]:
    t = f"inet {table}"
    chain, counter, fam = _names(f)
    v6 = _v6(f)
    ip = "ip6" if v6 else "ip"
    cmds = []
    if old is not None and old.family != f.family:  # another family, another chain
        cmds += remove_cmds(old, table)
        old = None
    if old is not None:
        cmds += _unmap_cmds(old, table)
    else:
        cmds += [f"add counter {t} {counter}", f"add chain {t} {chain}"]
    # Only packets for this host: a router's transit traffic that happens to use
    # the same ports is not ours.
    match = f"{ip} daddr {_addr(f.laddr, v6)} " if f.laddr else "fib daddr type local "
    dscp = ""
    if f.tos is not None and not v6:
        dscp = f"ip dscp set {(int(f.tos) >> 2) & 0x3F} "
    cmds += [
        f"flush chain {t} {chain}",
        f"add rule {t} {chain} {match}{ip} daddr set {_addr(f.dst, v6)} udp dport set {int(f.dport)} "
        f'udp sport set {int(f.out_port)} {dscp}counter name "{counter}" notrack accept',
        f"add element {t} in{fam} {{ {int(f.lport)} . {_addr(f.src, v6)} . {int(f.sport)} : goto {chain} }}",
        f"add element {t} src{fam} {{ {int(f.out_port)} . {_addr(f.dst, v6)} . {int(f.dport)} : "
        f"{_addr(saddr, v6)} }}",
    ]
    return cmds


def _unmap_cmds(f: K.Flow, table: str) -> list[str]:
    t = f"inet {table}"
    v6 = _v6(f)
    fam = "6" if v6 else "4"
    return [
        f"delete element {t} in{fam} {{ {int(f.lport)} . {_addr(f.src, v6)} . {int(f.sport)} }}",
        f"delete element {t} src{fam} {{ {int(f.out_port)} . {_addr(f.dst, v6)} . {int(f.dport)} }}",
    ]


def remove_cmds(f: K.Flow, table: str = TABLE) -> list[str]:
    t = f"inet {table}"
    chain, counter, _ = _names(f)
    return [*_unmap_cmds(f, table), f"delete chain {t} {chain}", f"delete counter {t} {counter}"]


def _is_local(addr: str, family: int = socket.AF_INET) -> bool:
    """A local address: DNAT'd traffic to it would be delivered here, not forwarded."""
    if ipaddress.ip_address(addr).is_loopback:
        return True
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
        return True


def _route_src(dst: str, dport: int, family: int = socket.AF_INET) -> str:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((dst, dport or 9))
        return s.getsockname()[0]


def ipv6_forwarding() -> bool:
    """The host forwards IPv6 (else IPv6 calls stay in userspace)."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/forwarding") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def probe(table: str = TABLE) -> Nft:
    """Set up our table; raises KernelError with the reason the kernel path is impossible."""
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            if fh.read().strip() == "0":
                raise KernelError("net.ipv4.ip_forward is 0: the kernel would not forward media")
    except OSError:
        pass
    nft = Nft()
    try:
        nft.run(base_ruleset(table))
    except KernelError as exc:
        nft.close()
        raise KernelError(f"can't set up nftables table inet {table}: {exc}") from None
    return nft


class KernelPath:
    """Keeps the kernel's forwarding state equal to what the sessions allow."""

    def __init__(
        self,
        nft: Nft,
        engine: Any,
        *,
        table: str = TABLE,
        poll: float = POLL,
        dup_small: bool = False,
        ipv6: bool | None = None,
    ) -> None:
        self.nft = nft
        self.engine = engine
        self.table = table
        self.poll = poll
        self.dup_small = dup_small
        self.ipv6 = ipv6_forwarding() if ipv6 is None else ipv6
        self._cv = threading.Condition()
        self._pending: dict[Any, list[threading.Event]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        # Worker-thread state: session -> {lport: Flow}; lport -> (stream, Flow).
        self._have: dict[Any, dict[int, K.Flow]] = {}
        self._by_port: dict[tuple[int, int], Any] = {}
        self._failed: set[Any] = set()
        self.installed: set[Any] = set()  # sessions with kernel state (read by others)
        # session -> the flows the worker last decided on (before the local-peer
        # filter); the periodic look touches a session whose wish moved since.
        self._decided: dict[Any, frozenset] = {}
        self.nflows = 0
        self.errors = 0
        self.npkts = 0  # packets the kernel forwarded, over the relay's life

    # ---- any thread ------------------------------------------------------------
    def touch(self, s: Any, ev: threading.Event | None = None) -> None:
        """Re-decide ``s`` soon (cheap; called from the media thread too)."""
        with self._cv:
            lst = self._pending.get(s)
            if lst is None:
                lst = self._pending[s] = []
            if ev is not None:
                lst.append(ev)
            self._cv.notify()

    def on_latch(self, st: Any) -> None:
        self.touch(st.session)

    def stats(self) -> dict:
        """For /metrics and /stats: what the kernel relays now and did so far."""
        return {
            "sessions": len(self.installed),
            "flows": self.nflows,
            "packets": self.npkts,
            "errors": self.errors,
        }

    # ---- control plane (Trio) ---------------------------------------------------
    async def evict(self, s: Any) -> None:
        """Move ``s`` back to userspace and wait until the kernel lets go of it."""
        import trio

        s.kernel_hold += 1
        # Always a round trip: the worker may be installing it right now.
        ev = threading.Event()
        self.touch(s, ev)
        await trio.to_thread.run_sync(ev.wait, 5.0)

    def release(self, s: Any) -> None:
        if s.kernel_hold > 0:
            s.kernel_hold -= 1
        self.touch(s)

    def candidates(self, sessions: Iterable[Any]) -> None:
        """Touch the sessions whose wish changed behind our back.

        Latching (the media thread) and the commands touch sessions
        themselves; this catches the rest: a prompt that ended, a session
        changed by another control protocol (MediaProxy's), RTCP that
        latched late.
        """
        decided = self._decided
        empty: frozenset = frozenset()
        for s in sessions:
            if s.complete and s not in self._failed:
                if frozenset(K.flows(s, dup_small=self.dup_small, ipv6=self.ipv6)) != decided.get(s, empty):
                    self.touch(s)

    async def run(self, sessions: Callable[[], Iterable[Any]], *, task_status: Any = None) -> None:
        """Trio service: the worker thread, and a periodic look for candidates."""
        import trio

        self.start()
        if task_status is not None:
            task_status.started()
        while True:
            await trio.sleep(self.poll)
            self.candidates(list(sessions()))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="pyrtpproxy-kernel", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker and remove every rule (the whole table)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.nft.run(f"add table inet {self.table}\ndelete table inet {self.table}")
        except KernelError as exc:
            log.error("can't remove nftables table inet %s: %s", self.table, exc)
        self._have.clear()
        self._decided.clear()
        self._by_port.clear()
        self.installed.clear()
        self.nft.close()

    # ---- worker thread ----------------------------------------------------------
    def _work(self) -> None:
        next_poll = time.monotonic() + self.poll
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    left = next_poll - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stop:
                    return
                batch, self._pending = self._pending, {}
            try:
                if batch:
                    self.sync(batch)
                if time.monotonic() >= next_poll:
                    self.read_counters()
                    next_poll = time.monotonic() + self.poll
            except Exception:  # never let one bad batch stop the worker
                self.errors += 1
                log.exception("kernel path: worker error")
            finally:
                for evs in batch.values():
                    for ev in evs:
                        ev.set()

    def _want(self, s: Any) -> dict[int, K.Flow]:
        out = {}
        for f in K.flows(s, dup_small=self.dup_small, ipv6=self.ipv6):
            if _is_local(f.src, f.family) or _is_local(f.dst, f.family):
                return {}  # a peer on this host: DNAT'd traffic would not be forwarded
            out[f.lport] = f
        return out

    def sync(self, batch: Iterable[Any]) -> None:
        """Bring the kernel in line with ``batch``'s sessions: removals first."""
        plans = []
        for s in batch:
            if s.deleted:
                self._failed.discard(s)
                self._decided.pop(s, None)
            else:
                self._decided[s] = frozenset(K.flows(s, dup_small=self.dup_small, ipv6=self.ipv6))
            want = {} if (s in self._failed or s.deleted) else self._want(s)
            plans.append((s, want))
        if any(set(self._have.get(s, ())) - set(want) for s, want in plans):
            self.read_counters()  # book what the leaving flows forwarded
        ops: list[tuple[Any, list[str], list[K.Flow], list[K.Flow]]] = []
        for s, want in plans:
            have = self._have.get(s, {})
            gone = [f for p, f in have.items() if p not in want]
            if gone:
                ops.append((s, [c for f in gone for c in remove_cmds(f, self.table)], gone, []))
        for s, want in plans:
            have = self._have.get(s, {})
            cmds: list[str] = []
            new = []
            for p, f in want.items():
                old = have.get(p)
                if old == f:
                    continue
                saddr = f.out_addr or _route_src(f.dst, f.dport, f.family)
                cmds += install_cmds(f, saddr, old, self.table)
                new.append(f)
            if cmds:
                ops.append((s, cmds, [], new))
        if not ops:
            return
        # One transaction for the whole batch (libnftables reads the table
        # once per call, so batching is what keeps this cheap under load).
        try:
            self.nft.run("\n".join(c for op in ops for c in op[1]))
        except KernelError:
            for s, cmds, gone, new in ops:  # find the culprit: one session at a time
                if s not in self._failed:
                    self._apply(s, cmds, gone, new)
            return
        for s, _cmds, gone, new in ops:
            self._commit(s, gone, new)

    def _apply(self, s: Any, cmds: list[str], gone: list[K.Flow], new: list[K.Flow]) -> None:
        try:
            self.nft.run("\n".join(cmds))
        except KernelError as exc:
            self.errors += 1
            log.error(
                "kernel path: nftables refused a change (%s); session stays in userspace",
                exc,
                extra={"callid": getattr(s, "call_id", None)},
            )
            self._failed.add(s)
            self._drop_all(s)
            return
        self._commit(s, gone, new)

    def _commit(self, s: Any, gone: list[K.Flow], new: list[K.Flow]) -> None:
        have = self._have.setdefault(s, {})
        for f in gone:
            have.pop(f.lport, None)
            self._by_port.pop((f.family, f.lport), None)
            self.nflows -= 1
        for f in new:
            if f.lport not in have:
                self.nflows += 1
            have[f.lport] = f
            self._by_port[(f.family, f.lport)] = (_stream_of(s, f.lport), f)
        if have:
            if s not in self.installed:
                log.info("session relayed by the kernel", extra={"callid": getattr(s, "call_id", None)})
            self.installed.add(s)
        else:
            self._have.pop(s, None)
            if s in self.installed:
                log.info("session back in userspace", extra={"callid": getattr(s, "call_id", None)})
            self.installed.discard(s)

    def _drop_all(self, s: Any) -> None:
        """After a failed change: remove what ``s`` had, command by command."""
        for f in self._have.pop(s, {}).values():
            for c in remove_cmds(f, self.table):
                try:
                    self.nft.run(c)
                except KernelError:
                    pass
            self._by_port.pop((f.family, f.lport), None)
            self.nflows -= 1
        self.installed.discard(s)

    def read_counters(self) -> None:
        """Read-and-reset every counter; book the packets in the media thread."""
        if not self._by_port:
            return
        # A fresh context: libnftables keeps a cache between calls that a
        # reset does not invalidate, so a reused context reports stale values.
        fresh = Nft()
        try:
            out = fresh.run(f"reset counters table inet {self.table}", as_json=True)
        finally:
            fresh.close()
        books = []
        for item in json.loads(out or "{}").get("nftables", ()):
            c = item.get("counter")
            if not c:
                continue
            n = int(c.get("packets", 0))
            name = c.get("name", "")
            if n <= 0 or name[:1] != "c" or name[2:3] != "_":
                continue
            v6 = name[1] == "6"
            nbytes = int(c.get("bytes", 0)) - (K.IPV6_UDP_HEADERS if v6 else K.IPV4_UDP_HEADERS) * n
            ent = self._by_port.get((socket.AF_INET6 if v6 else socket.AF_INET, int(name[3:])))
            if ent is None:
                continue
            books.append((ent[0], n, nbytes))
            self.npkts += n
        if books:
            self.engine.call(_book, self.engine, books)


def _stream_of(s: Any, lport: int) -> Any:
    for st in s.streams():
        if st.port == lport:
            return st
    return None


def _book(engine: Any, books: list) -> None:
    """In the media thread: kernel-forwarded packets count as relayed ones."""
    now = time.monotonic()
    for st, n, nbytes in books:
        if st is None:
            continue
        if st.sock is None:  # the stream is gone: its totals moved already
            engine.gone_rcvd += n
            engine.gone_relayed += n
            continue
        K.apply_counts(st, n, now, nbytes)


def check_environment(run_as: Any) -> None:
    """Reasons found before touching nftables (raise KernelError)."""
    if run_as is not None:
        raise KernelError("-u drops the privileges the kernel path needs (CAP_NET_ADMIN)")
    if os.geteuid() != 0:
        # not fatal by itself (capabilities), nftables decides; say why if it refuses
        log.debug("kernel path: not root; relying on CAP_NET_ADMIN")
