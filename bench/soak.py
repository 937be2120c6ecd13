"""An accelerated soak: hours of a relay's life in minutes.

    python -m bench.soak [--duration 300] [--calls 60] [--out bench/out/soak]
                         [--relay-args "--endpoint-learning heuristic"]

It starts ``python -m pyrtpproxy`` (foreground, loopback, ``-T``/``-W`` of
``--ttl`` seconds) and keeps ``--calls`` calls up, churning them: each call
is set up with U and L, carries RTP both ways at ``--pps`` packets a second
for a random length (``--call-len``, seconds), is re-INVITEd halfway (U/L
again; in half of them the caller moves to a new port, so the relay must
re-latch), and ends with D, or, for ``--abandon`` of them, is abandoned with
no D and left to time out.  Every ``--interval`` seconds it prints and
records:

* the relay's RSS and open fds (psutil), its sessions (I) and its created,
  destroyed and timed-out session counters (G);
* loss: packets the calls that ended in the interval sent minus those their
  peers received (a packet arriving for a port the caller just left counts
  as received: the relay delivered it);
* how long the relay took to answer that interval's I.

At the end it writes ``soak.json`` and ``soak.png`` (RSS, fds, sessions and
loss over time; needs matplotlib, the bench extra) to ``--out`` and exits 1
if the relay died, a control command went unanswered, or sessions leaked
(some still there ``--ttl`` + 5 s after the last call ended).  Everything
runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

PT_PCMU = 0
PAYLOAD = bytes([0xD5]) * 160


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Control:
    """The soak's controller: UDP commands with a cookie, retransmitted like Kamailio's."""

    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.n = 0
        self.failures = 0

    def cmd(self, text: str, timeout: float = 5.0) -> str | None:
        self.n += 1
        cookie = f"s{self.n}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendto(f"{cookie} {text}".encode(), self.addr)
            r, _, _ = select.select([self.sock], [], [], 0.5)
            while r:
                data = self.sock.recv(65535).decode("utf-8", "replace")
                c, _, reply = data.partition(" ")
                if c == cookie:
                    return reply.rstrip("\n")
                r, _, _ = select.select([self.sock], [], [], 0)
        self.failures += 1
        return None


class Call:
    def __init__(self, n: int, now: float, length: float, abandon: bool, move: bool) -> None:
        self.id = f"soak{n}"
        self.n = n
        self.start = now
        self.reinvite_at = now + length / 2
        self.end_at = now + length
        self.abandon = abandon
        self.move = move
        self.reinvited = False
        self.ended = False
        self.close_at = 0.0
        self.delete_at = 0.0
        self.a = self._sock()
        self.b = self._sock()
        self.old_a: socket.socket | None = None
        self.pa = self.pb = 0
        self.seq = 0
        self.sent = 0
        self.recv = 0

    @staticmethod
    def _sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        return s

    def socks(self) -> list[socket.socket]:
        return [s for s in (self.a, self.b, self.old_a) if s is not None]

    def close(self) -> None:
        for s in self.socks():
            s.close()


class Soak:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.o = opts
        self.rng = random.Random(opts.seed)
        self.calls: dict[int, Call] = {}
        self.by_fd: dict[int, Call] = {}
        self.ep = select.epoll()
        self.ncalls = 0
        self.samples: list[dict[str, Any]] = []
        self.int_sent = 0
        self.int_lost = 0
        self.tot_sent = 0
        self.tot_lost = 0
        self.reinvites = 0
        self.moves = 0
        self.abandoned = 0
        self.deleted = 0
        self.setup_failed = 0

    # ---- the relay -------------------------------------------------------------------------
    def start_relay(self) -> None:
        o = self.o
        self.ctl_port = free_udp_port()
        argv = [
            sys.executable, "-m", "pyrtpproxy", "-f", "-F",
            "-s", f"udp:127.0.0.1:{self.ctl_port}", "-l", "127.0.0.1",
            "-m", str(o.port_min), "-M", str(o.port_max),
            "-T", str(o.ttl), "-W", str(o.ttl), "-d", "ERR",
            *shlex.split(o.relay_args),
        ]  # fmt: skip
        self.relay = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.ctl = Control(self.ctl_port)
        if self.ctl.cmd("V", timeout=20) != "20040107":
            raise SystemExit("soak: the relay did not start")
        self.ctl.failures = 0
        self.proc = psutil.Process(self.relay.pid)

    def stop_relay(self) -> int:
        if self.relay.poll() is None:
            self.relay.send_signal(signal.SIGTERM)
            try:
                return self.relay.wait(20)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
                return -9
        return self.relay.returncode

    # ---- calls -------------------------------------------------------------------------
    def _register(self, c: Call, s: socket.socket) -> None:
        self.by_fd[s.fileno()] = c
        self.ep.register(s.fileno(), select.EPOLLIN)

    def _unregister(self, s: socket.socket) -> None:
        fd = s.fileno()
        if fd >= 0 and self.by_fd.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def new_call(self, now: float) -> None:
        o = self.o
        lo, hi = o.call_len
        c = Call(
            self.ncalls,
            now,
            self.rng.uniform(lo, hi),
            abandon=self.rng.random() < o.abandon,
            move=self.rng.random() < 0.5,
        )
        self.ncalls += 1
        r1 = self.ctl.cmd(f"U {c.id} 127.0.0.1 {c.a.getsockname()[1]} fA;1")
        r2 = self.ctl.cmd(f"L {c.id} 127.0.0.1 {c.b.getsockname()[1]} fA;1 tB;1") if r1 else None
        if not r1 or not r2 or r1.startswith("E") or r2.startswith("E"):
            self.setup_failed += 1
            c.close()
            return
        c.pb, c.pa = int(r1.split()[0]), int(r2.split()[0])
        self.calls[c.n] = c
        for s in c.socks():
            self._register(c, s)

    def reinvite(self, c: Call) -> None:
        c.reinvited = True
        self.reinvites += 1
        if c.move:  # the caller's new SDP: a new port (its old one is kept a while)
            self.moves += 1
            c.old_a, c.a = c.a, Call._sock()
            self._register(c, c.a)
        self.ctl.cmd(f"U {c.id} 127.0.0.1 {c.a.getsockname()[1]} fA;1 tB;1")
        self.ctl.cmd(f"L {c.id} 127.0.0.1 {c.b.getsockname()[1]} fA;1 tB;1")

    def end(self, c: Call, now: float) -> None:
        """The call's media stops; D (unless abandoned) once its last packets
        got through, as a BYE follows the last RTP."""
        c.ended = True
        c.delete_at = now + 0.2
        c.close_at = now + 0.5
        if c.abandon:
            self.abandoned += 1
            c.delete_at = 0.0
        else:
            self.deleted += 1

    def finish(self, c: Call) -> None:
        for s in c.socks():
            self._unregister(s)
        c.close()
        del self.calls[c.n]
        lost = max(0, c.sent - c.recv)
        self.int_sent += c.sent
        self.int_lost += lost
        self.tot_sent += c.sent
        self.tot_lost += lost

    def send_media(self) -> None:
        for c in self.calls.values():
            if c.ended:
                continue
            hdr = struct.pack("!BBHI", 0x80, PT_PCMU, c.seq & 0xFFFF, (c.seq * 160) & 0xFFFFFFFF)
            for sock, port, ssrc in ((c.a, c.pa, 0xA0000 + c.n), (c.b, c.pb, 0xB0000 + c.n)):
                try:
                    sock.sendto(hdr + struct.pack("!I", ssrc & 0xFFFFFFFF) + PAYLOAD, ("127.0.0.1", port))
                    c.sent += 1
                except OSError:
                    pass
            c.seq += 1

    def receive(self, timeout: float) -> None:
        for fd, _ in self.ep.poll(max(0.0, timeout), 512):
            c = self.by_fd.get(fd)
            if c is None:
                continue
            sock = next((s for s in c.socks() if s.fileno() == fd), None)
            if sock is None:
                continue
            while True:
                try:
                    sock.recv(2048)
                    c.recv += 1
                except (BlockingIOError, ConnectionRefusedError):
                    break

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, t: float) -> dict[str, Any]:
        t0 = time.monotonic()
        info = self.ctl.cmd("I") or ""
        lat = time.monotonic() - t0
        g = (self.ctl.cmd("G nsess_created nsess_destroyed nsess_timeout") or "-1 -1 -1").split()
        sessions = -1
        for line in info.splitlines():
            if line.startswith("active sessions:"):
                sessions = int(line.split(":")[1])
        try:
            rss = self.proc.memory_info().rss
            fds = self.proc.num_fds()
        except psutil.Error:
            rss = fds = -1
        s = {
            "t": round(t, 2),
            "rss_mb": round(rss / 2**20, 2),
            "fds": fds,
            "sessions": sessions,
            "calls": sum(1 for c in self.calls.values() if not c.ended),
            "created": int(g[0]) if g[0].lstrip("-").isdigit() else -1,
            "destroyed": int(g[1]) if len(g) > 1 and g[1].lstrip("-").isdigit() else -1,
            "timed_out": int(g[2]) if len(g) > 2 and g[2].lstrip("-").isdigit() else -1,
            "sent": self.int_sent,
            "lost": self.int_lost,
            "loss_pct": round(100.0 * self.int_lost / self.int_sent, 3) if self.int_sent else 0.0,
            "ctl_ms": round(lat * 1000, 2),
        }
        self.int_sent = self.int_lost = 0
        self.samples.append(s)
        if not self.o.quiet:
            print(
                f"t={s['t']:7.1f}s rss={s['rss_mb']:7.2f}MB fds={s['fds']:5d} sessions={s['sessions']:5d} "
                f"calls={s['calls']:4d} created={s['created']:6d} timed_out={s['timed_out']:5d} "
                f"loss={s['loss_pct']:6.3f}% ({s['lost']}/{s['sent']}) I={s['ctl_ms']:.1f}ms",
                flush=True,
            )
        return s

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.o
        self.start_relay()
        t_start = time.monotonic()
        self.sample(0.0)
        tick = 1.0 / o.pps
        next_tick = t_start
        next_sample = t_start + o.interval
        stop_new = t_start + o.duration
        # arrivals spread over the first call length, then one per call ending
        ramp = o.call_len[0] / max(1, o.calls)
        next_arrival = t_start
        try:
            while True:
                now = time.monotonic()
                if now >= next_tick:
                    self.send_media()
                    next_tick += tick
                    if next_tick < now:  # fell behind: do not burst to catch up
                        next_tick = now + tick
                live = sum(1 for c in self.calls.values() if not c.ended)
                if now < stop_new and live < o.calls and now >= next_arrival:
                    self.new_call(now)
                    next_arrival = now + ramp
                for c in list(self.calls.values()):
                    if c.ended:
                        if not c.abandon and c.delete_at and now >= c.delete_at:
                            c.delete_at = 0.0
                            self.ctl.cmd(f"D {c.id} fA tB")
                        if now >= c.close_at and not c.delete_at:
                            self.finish(c)
                        continue
                    if not c.reinvited and now >= c.reinvite_at:
                        self.reinvite(c)
                    if c.old_a is not None and now >= c.reinvite_at + 1.0:
                        self._unregister(c.old_a)
                        c.old_a.close()
                        c.old_a = None
                    if now >= c.end_at or now >= stop_new:
                        self.end(c, now)
                if now >= next_sample:
                    self.sample(now - t_start)
                    next_sample += o.interval
                if now >= stop_new and not self.calls:
                    break
                if self.relay.poll() is not None:
                    break
                self.receive(min(next_tick, next_sample) - time.monotonic())
            # the abandoned sessions time out: wait (bounded) for the table to empty
            deadline = time.monotonic() + o.ttl + 5
            sessions = -1
            while time.monotonic() < deadline and self.relay.poll() is None:
                info = self.ctl.cmd("I") or ""
                sessions = next(
                    (int(x.split(":")[1]) for x in info.splitlines() if x.startswith("active sessions:")), -1
                )
                if sessions == 0:
                    break
                time.sleep(0.5)
            self.sample(time.monotonic() - t_start)
        finally:
            for c in list(self.calls.values()):
                c.close()
            alive = self.relay.poll() is None
            code = self.stop_relay()
        first, last = self.samples[0], self.samples[-1]
        return {
            "meta": {
                "argv": sys.argv,
                "duration_s": o.duration,
                "calls": o.calls,
                "pps": o.pps,
                "ttl": o.ttl,
                "relay_args": o.relay_args,
                "cpu_count": os.cpu_count(),
                "loadavg": os.getloadavg(),
            },
            "samples": self.samples,
            "summary": {
                "calls_started": self.ncalls,
                "setup_failed": self.setup_failed,
                "deleted": self.deleted,
                "abandoned": self.abandoned,
                "reinvites": self.reinvites,
                "moves": self.moves,
                "packets_sent": self.tot_sent,
                "packets_lost": self.tot_lost,
                "loss_pct": round(100.0 * self.tot_lost / self.tot_sent, 4) if self.tot_sent else 0.0,
                "control_unanswered": self.ctl.failures,
                "relay_alive_at_end": alive,
                "relay_exit": code,
                "sessions_at_end": last["sessions"],
                "timed_out": last["timed_out"],
                "rss_mb_first_last_max": [
                    first["rss_mb"],
                    last["rss_mb"],
                    max(s["rss_mb"] for s in self.samples),
                ],
                "fds_first_last_max": [first["fds"], last["fds"], max(s["fds"] for s in self.samples)],
                "ctl_ms_max": max(s["ctl_ms"] for s in self.samples),
            },
        }


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib is not installed (pip install '.[bench]'): no PNG")
        return False
    s = res["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [x["rss_mb"] for x in s], marker=".")
    ax[0].set_ylabel("relay RSS (MB)")
    ax[1].plot(t, [x["fds"] for x in s], marker=".", color="tab:orange")
    ax[1].set_ylabel("relay open fds")
    ax[2].plot(t, [x["sessions"] for x in s], marker=".", color="tab:green", label="sessions (I)")
    ax[2].plot(t, [x["calls"] for x in s], marker=".", color="tab:gray", label="calls with media")
    ax[2].legend(loc="upper right")
    ax[2].set_ylabel("sessions")
    ax[3].plot(t, [x["loss_pct"] for x in s], marker=".", color="tab:red")
    ax[3].set_ylabel("loss (%)")
    ax[3].set_xlabel("seconds")
    m = res["meta"]
    fig.suptitle(
        f"pyrtpproxy soak: {m['calls']} calls at {m['pps']} pps, churned, re-INVITEs, timeouts (-T {m['ttl']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of churn (default 300)")
    ap.add_argument("--calls", type=int, default=60, help="concurrent calls (default 60)")
    ap.add_argument("--pps", type=int, default=50, help="packets a second each way per call (default 50)")
    ap.add_argument(
        "--call-len",
        type=lambda s: tuple(float(x) for x in s.split(":")),
        default=(10.0, 40.0),
        help="call length range in seconds, MIN:MAX (default 10:40)",
    )
    ap.add_argument("--abandon", type=float, default=0.2, help="share of calls left to time out (0.2)")
    ap.add_argument("--ttl", type=int, default=8, help="the relay's -T and -W (default 8 s)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--port-min", type=int, default=52000)
    ap.add_argument("--port-max", type=int, default=55998)
    ap.add_argument("--relay-args", default="", help="extra options for the relay")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/out/soak")
    ap.add_argument("--quiet", action="store_true")
    o = ap.parse_args(argv)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Soak(o).run()
    (out / "soak.json").write_text(json.dumps(res, indent=1))
    png = plot(res, out / "soak.png")
    s = res["summary"]
    print(
        f"soak: {s['calls_started']} calls ({s['deleted']} deleted, {s['abandoned']} timed out, "
        f"{s['reinvites']} re-INVITEs, {s['moves']} with a port change), {s['setup_failed']} setups failed; "
        f"packets {s['packets_sent']}, lost {s['packets_lost']} ({s['loss_pct']} %); "
        f"RSS first/last/max {s['rss_mb_first_last_max']} MB; fds first/last/max {s['fds_first_last_max']}; "
        f"sessions at the end {s['sessions_at_end']}; control unanswered {s['control_unanswered']}, "
        f"slowest I {s['ctl_ms_max']} ms; relay exit {s['relay_exit']}"
    )
    print(f"soak: wrote {out / 'soak.json'}" + (f" and {out / 'soak.png'}" if png else ""))
    bad = (
        not s["relay_alive_at_end"]
        or s["relay_exit"] != 0
        or s["control_unanswered"]
        or s["sessions_at_end"] != 0
        or s["setup_failed"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
