#!/usr/bin/env python3
"""Measure the pacing of pyrtpproxy's prompt player (P) over loopback.

Starts the relay as a separate process (``python -m pyrtpproxy``, or the
command in $RELAY, e.g. RELAY=/usr/bin/rtpproxy to compare), sets up
``--players`` calls, plays a PCMU prompt of ``--seconds`` to each caller
and timestamps every packet on arrival in a plain blocking receiver (not
the relay's event loop).  Prints, over all players:

* the mean inter-arrival interval (should be the ptime: no drift),
* |interval - ptime| (the jitter) mean / p50 / p99 / max,
* each packet's offset from its ideal time (first arrival + k * ptime):
  p50 / p99 / max, and the drift fitted over the whole run.

    .venv/bin/python bench/playback_jitter.py [--seconds 5] [--players 1]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pyrtpproxy import g711  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control(addr, text: str, timeout: float = 5.0) -> str:
    cookie = f"b{random.randrange(1 << 30)}"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        while time.monotonic() < deadline:
            s.send(f"{cookie} {text}".encode())
            s.settimeout(0.3)
            try:
                while True:
                    head, _, rest = s.recv(65535).decode().partition(" ")
                    if head == cookie:
                        return rest.strip()
            except (TimeoutError, ConnectionRefusedError):
                time.sleep(0.05)
    raise TimeoutError(text)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--players", type=int, default=1)
    args = ap.parse_args()
    ptime = 10.0  # ms, PCMU default
    npk = int(args.seconds * 1000 / ptime)

    tmp = tempfile.mkdtemp(prefix="pyrtpp-jitter-")
    pcm = b"".join(
        int(8000 * math.sin(2 * math.pi * 440 * i / 8000)).to_bytes(2, "little", signed=True)
        for i in range(npk * 80)
    )
    with open(os.path.join(tmp, "tone.0"), "wb") as f:
        f.write(g711.ulaw_encode(pcm))

    ctl = ("127.0.0.1", free_port())
    relay = shlex.split(os.environ.get("RELAY", "")) or [sys.executable, "-m", "pyrtpproxy"]
    argv = relay + [
        "-f",
        "-F",
        "-s",
        f"udp:{ctl[0]}:{ctl[1]}",
        "-l",
        "127.0.0.1",
        "-m",
        "20000",
        "-M",
        "29999",
        "-p",
        os.path.join(tmp, "pid"),
        "-d",
        "ERR",
    ]
    if not os.environ.get("RELAY"):
        argv += ["--prompt-dir", tmp]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        control(ctl, "V", timeout=15)
        sel = selectors.DefaultSelector()
        socks = []
        for i in range(args.players):
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for s in (a, b):
                s.bind(("127.0.0.1", 0))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            control(ctl, f"U j{i} 127.0.0.1 {a.getsockname()[1]} fA;1")
            control(ctl, f"L j{i} 127.0.0.1 {b.getsockname()[1]} fA;1 tB;1")
            sel.register(a, selectors.EVENT_READ, i)
            socks += [a, b]
        arrivals: list[list[float]] = [[] for _ in range(args.players)]
        prompt = os.path.join(tmp, "tone")
        for i in range(args.players):
            r = control(ctl, f"P j{i} {prompt} 0 fA;1 tB;1")
            if r != "0":
                print(f"P failed: {r}", file=sys.stderr)
                return 1
        end = time.monotonic() + args.seconds + 5
        left = args.players
        while left and time.monotonic() < end:
            for key, _ in sel.select(0.5):
                i = key.data
                key.fileobj.recv(2048)
                arrivals[i].append(time.monotonic())
                if len(arrivals[i]) == npk:
                    left -= 1
        ivals, dev, offs, drifts = [], [], [], []
        for ts in arrivals:
            if len(ts) < 2:
                continue
            t0 = ts[0]
            iv = [(b - a) * 1000 for a, b in zip(ts, ts[1:])]
            ivals += iv
            dev += [abs(x - ptime) for x in iv]
            off = [(t - t0) * 1000 - k * ptime for k, t in enumerate(ts)]
            offs += off
            k = list(range(len(off)))
            drifts.append(statistics.linear_regression(k, off).slope / ptime * 1000)  # ms per s
        got = sum(len(t) for t in arrivals)
        print(
            f"players={args.players} ptime={ptime:.0f}ms packets={got}/{npk * args.players} "
            f"duration={args.seconds:.1f}s relay={' '.join(relay)}"
        )
        print(f"interval  mean {statistics.fmean(ivals):.3f} ms")
        print(
            f"jitter |interval-ptime|  mean {statistics.fmean(dev):.3f}  p50 {pct(dev, 50):.3f}  "
            f"p99 {pct(dev, 99):.3f}  max {max(dev):.3f} ms"
        )
        print(
            f"offset from schedule  p50 {pct(offs, 50):.3f}  p99 {pct(offs, 99):.3f}  "
            f"max {max(offs):.3f} ms;  drift {statistics.fmean(drifts):+.4f} ms/s"
        )
        for s in socks:
            s.close()
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


if __name__ == "__main__":
    sys.exit(main())
