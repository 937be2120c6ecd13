"""Pure-Python fallback of ``loadgen.c`` (used when no C compiler is found).

Same command line and the same stdin/stdout protocol as the C program (see
its header comment), same packet layout, same JSON result.  It is much
slower (one ``sendto`` per packet), so results taken with it say so: it is
meant for the smoke test and for machines without gcc, not for finding a
relay's limit.

    python -m bench.loadgen NSOCK RCVBUF PPS SIZE WARMUP_MS DURATION_MS TAIL_MS DRAIN_MS BIND_IP RELAY_IP
"""

from __future__ import annotations

import json
import resource
import select
import socket
import struct
import sys
import time

MAGIC = 0x42505452
PAYLOAD = struct.Struct("<IIBBHq")  # magic, sid, dir, measured, pad, ts_ns
RTP = struct.Struct("!BBHII")
TICK_NS = 1_000_000
HIST_BIN_NS = 10_000
HIST_BINS = 20_000
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = 40
TS = struct.Struct("@qq")


def _open(ip: str, rcvbuf: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    for opt, fallback, val in ((33, socket.SO_RCVBUF, rcvbuf), (32, socket.SO_SNDBUF, 4 << 20)):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, val)  # SO_RCVBUFFORCE / SO_SNDBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, fallback, val)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    except OSError:
        pass
    s.bind((ip, 0))
    return s


def main(argv: list[str]) -> int:
    if len(argv) != 10:
        print(__doc__, file=sys.stderr)
        return 2
    nsock, rcvbuf, pps, size = (int(x) for x in argv[:4])
    warmup, duration, tail, drain = (int(x) * 1_000_000 for x in argv[4:8])
    bind_ip, relay_ip = argv[8], argv[9]
    out = sys.stdout
    socks_a = [_open(bind_ip, rcvbuf) for _ in range(nsock)]
    socks_b = [_open(bind_ip, rcvbuf) for _ in range(nsock)]
    out.write(
        "PORTS "
        + ",".join(str(s.getsockname()[1]) for s in socks_a)
        + ";"
        + ",".join(str(s.getsockname()[1]) for s in socks_b)
        + "\n"
    )
    out.flush()

    nsess = int(sys.stdin.readline())
    sids, st_sock, st_dst = [], [], []
    for _ in range(nsess):
        sid, ia, ib, pa, pb = (int(x) for x in sys.stdin.readline().split())
        sids.append(sid)
        st_sock += [socks_a[ia], socks_b[ib]]
        st_dst += [(relay_ip, pa), (relay_ip, pb)]
    base = sids[0]
    if sids != list(range(base, base + nsess)):
        return 3
    nstreams = 2 * nsess
    st_seq = [(j * 7919) & 0xFFFF for j in range(nstreams)]
    st_ts = [(j * 104729) & 0xFFFFFFFF for j in range(nstreams)]
    sent = [0] * nstreams
    recv = [0] * nstreams
    nslots = max(1, (1_000_000_000 // pps) // TICK_NS)
    slots = [[j for j in range(nstreams) if j % nslots == s] for s in range(nslots)]
    filler = bytes(size - RTP.size - PAYLOAD.size)
    hist: dict[int, int] = {}
    stats = dict(
        recv_unmeasured=0,
        bad=0,
        send_err=0,
        send_partial=0,
        late_ticks=0,
        max_late_ns=0,
        hist_over=0,
        hist_neg=0,
    )
    ovfl = {}
    allsocks = socks_a + socks_b
    ep = select.epoll()
    fdmap = {}
    for s in allsocks:
        ep.register(s.fileno(), select.EPOLLIN)
        fdmap[s.fileno()] = s
    cmsg_space = socket.CMSG_SPACE(TS.size) + socket.CMSG_SPACE(4)

    def drain_sock(s: socket.socket) -> None:
        while True:
            try:
                data, anc, _flags, _addr = s.recvmsg(2048, cmsg_space)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue
            rx = None
            for lvl, typ, cdata in anc:
                if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(cdata) >= TS.size:
                    sec, nsec = TS.unpack_from(cdata)
                    rx = sec * 1_000_000_000 + nsec
                elif lvl == socket.SOL_SOCKET and typ == SO_RXQ_OVFL and len(cdata) >= 4:
                    v = int.from_bytes(cdata[:4], sys.byteorder)
                    ovfl[s.fileno()] = max(ovfl.get(s.fileno(), 0), v)
            if rx is None:
                rx = time.time_ns()
            if len(data) < RTP.size + PAYLOAD.size:
                stats["bad"] += 1
                continue
            magic, sid, d, measured, _pad, ts = PAYLOAD.unpack_from(data, RTP.size)
            if magic != MAGIC or d > 1 or not (base <= sid < base + nsess):
                stats["bad"] += 1
                continue
            if not measured:
                stats["recv_unmeasured"] += 1
                continue
            recv[(sid - base) * 2 + d] += 1
            lat = rx - ts
            if lat < 0:
                stats["hist_neg"] += 1
                lat = 0
            b = lat // HIST_BIN_NS
            if b >= HIST_BINS:
                stats["hist_over"] += 1
            else:
                hist[b] = hist.get(b, 0) + 1

    def send_slot(slot: int, measured: int) -> None:
        ts = time.time_ns()
        for j in slots[slot]:
            hdr = RTP.pack(0x80, 0, st_seq[j], st_ts[j], 0x10000000 + j)
            st_seq[j] = (st_seq[j] + 1) & 0xFFFF
            st_ts[j] = (st_ts[j] + 160) & 0xFFFFFFFF
            pkt = hdr + PAYLOAD.pack(MAGIC, base + j // 2, j & 1, measured, 0, ts) + filler
            try:
                st_sock[j].sendto(pkt, st_dst[j])
            except OSError:
                stats["send_err"] += 1
                continue
            if measured:
                sent[j] += 1

    t0 = time.monotonic_ns() + 2 * TICK_NS
    total = (warmup + duration + tail) // TICK_NS
    win_start, win_end = warmup // TICK_NS, (warmup + duration) // TICK_NS
    stop_at = t0 + total * TICK_NS + drain
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    nxt = 0
    started = ended = False
    while True:
        now = time.monotonic_ns()
        due = t0 + nxt * TICK_NS if nxt < total else stop_at
        timeout = max(0.0, (due - now) / 1e9)
        for fd, _ev in ep.poll(min(timeout, 0.05)):
            drain_sock(fdmap[fd])
        now = time.monotonic_ns()
        while nxt < total and t0 + nxt * TICK_NS <= now:
            late = now - (t0 + nxt * TICK_NS)
            stats["max_late_ns"] = max(stats["max_late_ns"], late)
            if late > 5 * TICK_NS:
                stats["late_ticks"] += 1
            if nxt == win_start and not started:
                out.write(f"START {time.time_ns()}\n")
                out.flush()
                started = True
            if nxt == win_end and not ended:
                out.write(f"END {time.time_ns()}\n")
                out.flush()
                ended = True
            send_slot(nxt % nslots, int(win_start <= nxt < win_end))
            nxt += 1
            now = time.monotonic_ns()
        if nxt >= total and now >= stop_at:
            break
    if not started:
        out.write(f"START {time.time_ns()}\n")
    if not ended:
        out.write(f"END {time.time_ns()}\n")
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    result = dict(
        sent=sum(sent),
        recv=sum(min(r, s) for r, s in zip(recv, sent)),
        rxq_ovfl=sum(ovfl.values()),
        cpu_s=cpu,
        wall_s=(time.monotonic_ns() - t0) / 1e9,
        hist_bin_ns=HIST_BIN_NS,
        hist=sorted([b, c] for b, c in hist.items()),
        lossy=[[base + j // 2, j & 1, sent[j] - recv[j]] for j in range(nstreams) if recv[j] < sent[j]],
        **stats,
    )
    out.write("RESULT " + json.dumps(result) + "\n")
    out.flush()
    for s in allsocks:
        s.close()
    ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
