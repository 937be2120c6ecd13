"""CPU per packet of the kernel path's forwarding, measured from the sender (root).

    sudo .venv/bin/python -m bench.kernel_cost [--packets 200000] [--rounds 5]

Three namespaces (tests/netnsutil.py: caller A, relay R, callee B, veth pairs),
no RPS, so everything the kernel does for a packet sent by A (the veth hops,
R's prerouting rewrite, routing and forwarding, postrouting, B's socket)
runs in A's sending thread and shows in its CPU time (RUSAGE_THREAD).  Three
paths, best of ``--rounds``:

* blackhole: A's own cost (Python sendto, a route to a blackhole);
* plain: A -> R -> B, R forwarding without rules;
* kernel: A -> R:40000 -> B, through the relay's nftables rewrite
  (media/kernel.py's rules for one flow).

kernel - blackhole is the whole hop beyond the sender; kernel - plain is what
the rewrite adds.  Nothing here is a relay process: this is the kernel's
share only, on whatever else runs on the machine (run it on a quiet one).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import struct

from pyrtpproxy.media import kernel as KM
from pyrtpproxy.sessions.kernel import Flow
from tests.netnsutil import A_ADDR, B_ADDR, RA_ADDR, RB_ADDR, Topology, inside, unavailable


def cpu_per_pkt(sock: socket.socket, dst: tuple, packets: int, rounds: int) -> float:
    pkt = struct.pack("!BBHII", 0x80, 0, 1, 1, 0x1234) + b"\xd5" * 160
    best = float("inf")
    for _ in range(rounds):
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        for _ in range(packets):
            try:
                sock.sendto(pkt, dst)
            except OSError:
                pass
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        best = min(best, ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / packets * 1e6)
    return best


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_cost")
    p.add_argument("--packets", type=int, default=200000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", type=int, default=None, help="pin the sender to this CPU")
    args = p.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"kernel_cost: {why}")
    topo = Topology()
    try:
        topo.sh(topo.a, "ip route add blackhole 10.99.0.0/16")
        with inside(topo.r):
            nft = KM.probe()
        f = Flow(40000, None, A_ADDR, 5000, B_ADDR, 6000, 40002, None, 0xB8)
        nft.run("\n".join(KM.install_cmds(f, RB_ADDR, None)))
        a = topo.udp(topo.a, A_ADDR, 5000)
        b = topo.udp(topo.b, B_ADDR, 6000)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # B never reads: drops once full
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        n, r = args.packets, args.rounds
        hole = cpu_per_pkt(a, ("10.99.0.1", 9), n, r)
        plain = cpu_per_pkt(a, (B_ADDR, 6000), n, r)
        kern = cpu_per_pkt(a, (RA_ADDR, 40000), n, r)
        print(f"sender only (blackhole)      {hole:6.2f} us/packet")
        print(f"A -> R -> B, plain forward   {plain:6.2f} us/packet  (+{plain - hole:.2f} beyond the sender)")
        print(
            f"A -> R -> B, --kernel rules  {kern:6.2f} us/packet  (+{kern - hole:.2f}; rewrite +{kern - plain:.2f})"
        )
        nft.close()
    finally:
        topo.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
