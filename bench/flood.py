"""A stranger spraying RTP at every port of a relay's range (the flood scenario).

    python -m bench.flood --host 127.0.0.1 --ports 10000-32000 --pps 20000 --duration 14

Sends ``--size``-byte RTP-looking packets (its own SSRC, rising sequence
numbers) round-robin to every port of the range, odd and even, paced in 2 ms
slices to ``--pps`` packets per second, from ``--sockets`` source sockets
(each its own source port).  Only to ``--host``, which must be a loopback
address (or, with ``--netns``, the relay's address in the veth pair the
harness created).  Prints ``SENT <n> ERR <n>`` when done or on SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import struct
import sys
import time

SLICE = 0.002


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", required=True, help="FIRST-LAST")
    p.add_argument("--pps", type=float, default=20000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--size", type=int, default=172)
    p.add_argument("--sockets", type=int, default=4)
    p.add_argument(
        "--netns", action="store_true", help="--host is the relay's address in the harness's own namespaces"
    )
    a = p.parse_args(argv)
    if not a.netns and not ipaddress.ip_address(a.host).is_loopback:
        p.error("--host must be a loopback address (or --netns)")
    first, _, last = a.ports.partition("-")
    lo, hi = int(first), int(last or first)
    if not 0 < lo <= hi < 65536:
        p.error("bad --ports")
    socks = []
    for _ in range(max(1, a.sockets)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((a.host, 0))
        socks.append(s)
    payload = b"\x55" * max(0, a.size - 12)
    hdr = struct.Struct("!BBHII")
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sent = errs = 0
    port = lo
    seq = 0
    k = 0
    t0 = time.monotonic()
    end = t0 + a.duration
    while not stop:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * a.pps) - sent - errs
        for _ in range(max(0, due)):
            pkt = hdr.pack(0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, 0x5EEDF00D) + payload
            try:
                socks[k].sendto(pkt, (a.host, port))
                sent += 1
            except OSError:
                errs += 1  # a full buffer, or ECONNREFUSED from an ICMP error
            seq += 1
            k = (k + 1) % len(socks)
            port = lo if port >= hi else port + 1
        time.sleep(SLICE)
    print(f"SENT {sent} ERR {errs}", flush=True)
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
