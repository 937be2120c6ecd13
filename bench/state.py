"""--state: control-command latency and rate with the store off, SQLite and Redis,
and the media gap across a kill -9 restart.

    python -m bench.state [--sessions 500] [--clients 1,4] [--calls 20] [--json out.json]

For each store ("off", "sqlite", "redis" when redis-server is installed) a fresh
relay process runs ``--sessions`` calls of U, L and D over ``--clients``
parallel control clients (bench/control.py, Kamailio's way of talking); the
figures are per command, from first send to reply.

Restart gap: a relay with --state sqlite carries ``--calls`` calls with media
both ways (50 packets/s per direction); it is killed with SIGKILL and started
again at once.  Reported: the time from the kill to the relay answering V
("ready"), from ready to the first packet of every call relayed again, and
each call's longest gap between two packets received by a phone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .control import run_phase

# Below the ephemeral range, so a restart gets its ports back; the control
# port is the range's last but one (the relay skips it).
PORT_MIN, PORT_MAX = 2000, 9999


def _free(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(port: int, text: str, timeout: float = 2.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"b " + text.encode(), ("127.0.0.1", port))
        return s.recv(65535).decode()[2:].strip()


class Relay:
    def __init__(self, state: str | None, log: Path) -> None:
        self.port = PORT_MAX - 1
        self.args = [sys.executable, "-m", "pyrtpproxy", "-f", "-F", "-s", f"udp:127.0.0.1:{self.port}",
                     "-l", "127.0.0.1", "-m", str(PORT_MIN), "-M", str(PORT_MAX), "-d", "ERR"]  # fmt: skip
        if state:
            self.args += ["--state", state, "--state-node", "bench"]
        self.log = log
        self.p: subprocess.Popen | None = None

    def start(self) -> float:
        with open(self.log, "a") as fe:
            self.p = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fe
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"relay exited: {self.log.read_text()[-2000:]}")
            try:
                if _cmd(self.port, "V", 0.1) == "20040107":
                    return time.monotonic()
            except OSError:
                pass
        raise RuntimeError("relay not ready")

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait()


class Redis:
    def __init__(self, tmp: Path) -> None:
        self.port = _free(socket.SOCK_STREAM)
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.p = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait()


def control(state: str | None, tmp: Path, sessions: int, clients: list[int]) -> dict:
    out = {}
    for n in clients:
        relay = Relay(state, tmp / "relay.log")
        relay.start()
        try:
            for phase, fmt in (
                ("U", "U bs{i} 127.0.0.1 {p} f{i}"),
                ("L", "L bs{i} 127.0.0.1 {q} f{i} t{i}"),
                ("D", "D bs{i} f{i} t{i}"),
            ):
                cmds = [
                    fmt.format(i=i, p=20000 + 2 * (i % 5000), q=30000 + 2 * (i % 5000))
                    for i in range(sessions)
                ]
                out[f"{phase} clients={n}"] = run_phase(phase, ("127.0.0.1", relay.port), cmds, n).summary()
        finally:
            relay.kill()
    return out


def _rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + b"\xd5" * 160


def restart_gap(state: str, tmp: Path, ncalls: int, settle: float = 2.0) -> dict:
    relay = Relay(state, tmp / "restart.log")
    relay.start()
    calls = []
    for i in range(ncalls):
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        pa = int(_cmd(relay.port, f"U gap{i} 127.0.0.1 {a.getsockname()[1]} ft").split()[0])
        pb = int(_cmd(relay.port, f"L gap{i} 127.0.0.1 {b.getsockname()[1]} ft tt").split()[0])
        calls.append((a, b, pa, pb))
    arrivals: list[list[float]] = [[] for _ in calls]
    stop = threading.Event()

    def pump() -> None:
        seq = 0
        nxt = time.monotonic()
        while not stop.is_set():
            seq += 1
            for a, b, pa, pb in calls:
                try:
                    a.sendto(_rtp(seq, 1), ("127.0.0.1", pb))
                    b.sendto(_rtp(seq, 2), ("127.0.0.1", pa))
                except OSError:
                    pass
            nxt += 0.02
            time.sleep(max(0.0, nxt - time.monotonic()))

    def receive() -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for k, (_a, b, _pa, _pb) in enumerate(calls):
            b.setblocking(False)
            sel.register(b, selectors.EVENT_READ, k)
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                try:
                    while True:
                        key.fileobj.recv(65535)
                        arrivals[key.data].append(time.monotonic())
                except BlockingIOError:
                    pass

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=receive, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(settle)
    t_kill = time.monotonic()
    relay.kill()
    t_ready = relay.start()
    time.sleep(settle)
    stop.set()
    for t in threads:
        t.join()
    relay.kill()
    gaps, first = [], []
    for arr in arrivals:
        after = [t for t in arr if t >= t_ready]
        first.append((after[0] - t_ready) if after else float("inf"))
        gaps.append(max((y - x for x, y in zip(arr, arr[1:])), default=float("inf")))
    for a, b, _pa, _pb in calls:
        a.close()
        b.close()
    return {
        "calls": ncalls,
        "kill_to_ready_ms": round((t_ready - t_kill) * 1e3, 1),
        "ready_to_media_ms_max": round(max(first) * 1e3, 1),
        "ready_to_media_ms_median": round(sorted(first)[len(first) // 2] * 1e3, 1),
        "media_gap_ms_max": round(max(gaps) * 1e3, 1),
        "media_gap_ms_median": round(sorted(gaps)[len(gaps) // 2] * 1e3, 1),
    }


def main(argv: list[str] | None = None) -> int:
    global PORT_MIN, PORT_MAX
    ap = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--settle", type=float, default=2.0, help="s of media before the kill and after ready")
    ap.add_argument("--ports", default=f"{PORT_MIN}-{PORT_MAX}", help="the relay's media range LO-HI")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    PORT_MIN, PORT_MAX = (int(x) for x in args.ports.split("-"))
    clients = [int(x) for x in args.clients.split(",")]
    results: dict = {"sessions": args.sessions, "control": {}, "restart": {}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        results["control"]["off"] = control(None, tmp, args.sessions, clients)
        results["control"]["sqlite"] = control(f"sqlite:{tmp / 'c.db'}", tmp, args.sessions, clients)
        redis = None
        have_redis = (
            shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")
        ) and not args.no_redis
        if have_redis:
            try:
                import redis as _r  # noqa: F401

                redis = Redis(tmp)
            except ImportError:
                redis = None
        try:
            if redis is not None:
                results["control"]["redis"] = control(redis.url, tmp, args.sessions, clients)
            results["restart"]["sqlite"] = restart_gap(f"sqlite:{tmp / 'r.db'}", tmp, args.calls, args.settle)
            if redis is not None:
                results["restart"]["redis"] = restart_gap(redis.url, tmp, args.calls, args.settle)
        finally:
            if redis is not None:
                redis.stop()
    print("store   phase           rate/s   p50 ms   p99 ms   max ms  errors")
    for store, phases in results["control"].items():
        for name, s in phases.items():
            print(
                f"{store:7} {name:14} {s['rate_per_s']:8} {s['lat_p50_ms']:8} {s['lat_p99_ms']:8} "
                f"{s['lat_max_ms']:8} {s['errors'] + s['timeouts']:6}"
            )
    for store, r in results["restart"].items():
        print(f"restart ({store}, kill -9): " + ", ".join(f"{k}={v}" for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
