"""Per-packet cost of the media engine loop on a fixed, repeatable workload.

    python -m bench.engine_cost [--calls 200] [--rounds 50] [--per-socket 1]
    valgrind --tool=callgrind python -m bench.engine_cost ...   # instructions

One process, one thread, loopback only: ``--calls`` calls (two RTP streams
each, latched), and per round every caller sends ``--per-socket`` packets to
its relay socket, then the engine loop runs exactly one epoll batch and
relays them to the callee's socket (not read; its buffer overflows, which
costs the relay nothing extra).  The loop is the engine's own ``_loop``,
stopped after one batch by a queued job, so the figure is the engine's
per-packet work as it runs in the relay, minus nothing but the senders.

Prints CPU µs per relayed packet (``time.process_time``, so other load on
the machine matters little) with the senders' share measured separately and
subtracted.  Under callgrind, the engine's instructions per packet are
(I(--rounds R) - I(--rounds R --senders-only)) / (R x calls); comparing two
trees with the same arguments is exact: the workload is identical.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_cost")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-socket", type=int, default=1, help="packets per socket per batch (default 1)")
    p.add_argument("--strangers", type=int, default=0, help="stranger packets per socket per batch")
    p.add_argument(
        "--senders-only",
        action="store_true",
        help="only the senders' share (for subtracting under callgrind)",
    )
    a = p.parse_args(argv)

    from pyrtpproxy.media.engine import MediaEngine, bind_pair
    from pyrtpproxy.sessions.session import Session

    eng = MediaEngine()
    senders = []
    sinks = []
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    stranger.setblocking(False)
    port = 36000
    sessions = []
    for i in range(a.calls):
        s = Session.new(f"c{i}", "f", 0.0, 60)
        # the caller sends on stream 0's socket, the engine relays out of stream 1's to the callee
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind(("127.0.0.1", 0))
        caller.setblocking(False)
        callee = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        callee.bind(("127.0.0.1", 0))
        callee.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for st, remote in ((s.rtp[0], caller.getsockname()), (s.rtp[1], callee.getsockname())):
            while True:
                try:
                    rtp, rtcp = bind_pair(socket.AF_INET, "127.0.0.1", port, None)
                    break
                except OSError:
                    port += 2
            for x, sock, pt in ((st, rtp, port), (st.rtcp_twin, rtcp, port + 1)):
                x.sock, x.fd, x.port, x.family, x.laddr = sock, sock.fileno(), pt, socket.AF_INET, "127.0.0.1"
                x.active = True
            port += 2
            st.remote = remote
            st.latched = True
            st.ssrc = 0x1000 + i
            eng.add(st)
            eng.add(st.rtcp_twin)
        senders.append((caller, ("127.0.0.1", s.rtp[0].port)))
        sinks.append(callee)
        sessions.append(s)
    pkt = [struct.pack("!BBHII", 0x80, 0, k, k * 160, 0) + b"\xd5" * 160 for k in range(64)]
    spkt = struct.pack("!BBHII", 0x80, 0, 7, 7, 0x5EED) + b"\x55" * 160

    # the senders' own cost, measured on the same sends to the callees' (full) sockets
    dummies = [(sock, sink.getsockname()) for (sock, _), sink in zip(senders, sinks)]

    def send_round(targets: list = senders) -> None:
        for k in range(a.per_socket):
            for sock, dst in targets:
                sock.sendto(pkt[k], dst)
        for _ in range(a.strangers):
            for _sock, dst in targets:
                stranger.sendto(spkt, dst)

    def one_batch() -> None:
        def stop() -> None:
            eng._stop = True

        eng.call(stop)
        eng._loop()
        eng._stop = False

    # warm up (first-touch allocations), then the senders alone, then senders + engine
    send_round()
    one_batch()
    t0 = time.process_time()
    for _ in range(a.rounds):
        send_round(dummies)
    t_send = time.process_time() - t0
    before = sum(s.rtp[0].nrelayed for s in sessions)
    t0 = time.process_time()
    for _ in range(0 if a.senders_only else a.rounds):
        send_round()
        one_batch()
    t_all = time.process_time() - t0
    relayed = sum(s.rtp[0].nrelayed for s in sessions) - before
    total = a.rounds * a.calls * a.per_socket
    print(
        f"calls {a.calls} rounds {a.rounds} per-socket {a.per_socket} strangers {a.strangers}: "
        f"relayed {relayed}/{total}, foreign dropped {eng.npkts_foreign}; "
        f"engine {((t_all - t_send) / max(1, relayed)) * 1e6:.2f} us CPU/pkt "
        f"(senders {t_send / max(1, total) * 1e6:.2f} us/pkt, subtracted)"
    )
    eng.stop()
    for s in senders:
        s[0].close()
    for s in sinks:
        s.close()
    stranger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
