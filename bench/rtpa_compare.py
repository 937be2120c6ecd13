"""Side by side: the RTP analyser (Q rtpa_* / longest_ipi / jitter, G rtpa_*)
and the re-packetiser (Z, G npkts_resizer_*) of pyrtpproxy and of a real
rtpproxy, fed the same packets over loopback.

    python -m bench.rtpa_compare --rtpproxy /path/to/rtpproxy [--json out.json]

Each scenario starts a fresh relay (``-f -s udp:127.0.0.1:PORT -l 127.0.0.1``),
sets up one call, sends a scripted RTP stream (loss, duplicates,
reordering, wrap, SSRC change, bad packets, timing jitter) from the caller,
and reads Q and G.  Counters must agree exactly; jitter and longest_ipi
depend on arrival times, so they are printed side by side (the send times
are the same script for both).  pyrtpproxy runs with ``--analyze`` (rtpproxy
always analyses).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

COUNTERS = "rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs"
TIMING = "longest_ipi rtpa_jlast rtpa_jmax rtpa_javg"
GNAMES = "rtpa_nsent rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs npkts_resizer_in npkts_resizer_out npkts_resizer_discard"


def rtp(
    seq: int, ts: int, ssrc: int = 0x1234, pt: int = 0, payload: bytes = b"\xd5" * 160, m: bool = False
) -> bytes:
    return struct.pack("!BBHII", 0x80, pt | (0x80 if m else 0), seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def _seqs(seqs, step=160, **kw):
    return [(0.02, rtp(s, s * step, **kw)) for s in seqs]


# scenario: (name, Z modifier or "", [(delay before sending, packet)])
def scenarios() -> list[tuple[str, str, list[tuple[float, bytes]]]]:
    out = []
    out.append(("in order", "", _seqs(range(100, 150))))
    out.append(("loss", "", _seqs([s for s in range(200, 260) if s % 7 != 3])))
    out.append(("duplicates", "", _seqs([200, 201, 201, 202, 203, 203, 203, 204, 205])))
    out.append(("reorder", "", _seqs([300, 302, 301, 303, 305, 304, 306, 309, 307, 308, 310])))
    out.append(("reorder below start", "", _seqs([400, 398, 399, 401, 397, 402])))
    out.append(("wrap", "", _seqs([65530 + i for i in range(12)])))
    out.append(("pre-wrap after wrap", "", _seqs([65533, 65534, 65535, 0, 1, 65532, 2, 3])))
    out.append(("desync jump", "", _seqs([10, 11, 12, 2000, 2001, 2002])))
    ssrc = _seqs(range(50, 60)) + [(0.02, rtp(s, s * 160, ssrc=0x9999)) for s in range(7000, 7010)]
    out.append(("ssrc change", "", ssrc))
    marker = _seqs(range(500, 510)) + [(0.02, rtp(s, s * 160, m=(s == 20))) for s in range(20, 30)]
    out.append(("marker seq reset", "", marker))
    bad = _seqs(range(600, 605)) + [
        (0.02, b"\x80\x00\x01"),
        (0.02, b"\x40" + b"\x00" * 20),
        (0.02, b"\x81\xc8" + b"\x00" * 30),
    ]
    out.append(("parse errors", "", bad + _seqs(range(605, 610))))
    jit = []
    for i, s in enumerate(range(700, 760)):
        jit.append((0.02 + (0.008 if i % 5 == 0 else -0.002 if i % 5 == 1 else 0.0), rtp(s, s * 160)))
    out.append(("jitter", "", jit))
    gap = _seqs(range(800, 810)) + [(0.35, rtp(810, 810 * 160))] + _seqs(range(811, 815))
    out.append(("long gap", "", gap))
    out.append(
        ("Z20 from 10 ms", "Z20", [(0.01, rtp(s, s * 80, payload=b"\x11" * 80)) for s in range(1000, 1040)])
    )
    out.append(
        ("Z10 from 30 ms", "Z10", [(0.03, rtp(s, s * 240, payload=b"\x22" * 240)) for s in range(2000, 2015)])
    )
    out.append(
        (
            "Z40 PCMA 20 ms",
            "Z40",
            [(0.02, rtp(s, s * 160, pt=8, payload=b"\x33" * 160)) for s in range(3000, 3030)],
        )
    )
    out.append(
        (
            "Z30 G729 10 ms",
            "Z30",
            [(0.01, rtp(s, s * 80, pt=18, payload=b"\x44" * 10)) for s in range(4000, 4030)],
        )
    )
    z_loss = [(0.02, rtp(s, s * 160, payload=b"\x55" * 160)) for s in range(5000, 5030) if s % 6 != 2]
    out.append(("Z40 with loss", "Z40", z_loss))
    return out


class Relay:
    def __init__(self, argv: list[str], ctrl_port: int) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addr = ("127.0.0.1", ctrl_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.n = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.cmd("V", timeout=0.2) == "20040107":
                    return
            except TimeoutError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("relay did not start: " + " ".join(argv))

    def cmd(self, text: str, timeout: float = 3.0) -> str:
        self.n += 1
        cookie = "k%d" % self.n
        self.sock.sendto(f"{cookie} {text}".encode(), self.addr)
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                raise TimeoutError(text) from None
            c, _, reply = data.decode().partition(" ")
            if c == cookie:
                return reply.strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def run_scenario(argv_for, name: str, zmod: str, pkts) -> dict:
    ctrl = _free_port()
    relay = Relay(argv_for(ctrl), ctrl)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    try:
        pu = int(relay.cmd(f"U{zmod} cmp 127.0.0.1 {a.getsockname()[1]} fA").split()[0])
        pl = int(relay.cmd(f"L cmp 127.0.0.1 {b.getsockname()[1]} fA tB").split()[0])
        t = time.monotonic()
        for delay, pkt in pkts:
            t += delay
            while time.monotonic() < t:
                pass  # busy-wait: the schedule is the same for both relays
            a.sendto(pkt, ("127.0.0.1", pl))
        time.sleep(0.3)
        b.settimeout(0.05)
        got = []
        while True:
            try:
                got.append(b.recv(65535))
            except TimeoutError:
                break
        q = relay.cmd(f"Qv cmp fA tB {COUNTERS} {TIMING}")
        relay.cmd("D cmp fA tB")
        g = relay.cmd(f"Gv {GNAMES}")
        del pu
        out = [
            (len(p) - 12, *struct.unpack("!HI", p[2:8])) if len(p) >= 12 else (len(p) - 12, -1, -1)
            for p in got
        ]
        return {
            "Q": dict(kv.split("=") for kv in q.split()),
            "G": dict(kv.split("=") for kv in g.split()),
            "out": out,
        }
    finally:
        a.close()
        b.close()
        relay.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtpproxy", required=True)
    ap.add_argument(
        "--pyrtpproxy", default=f"{sys.executable} -m pyrtpproxy", help="command line (split on spaces)"
    )
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated parts of scenario names")
    args = ap.parse_args()
    common = ["-f", "-F", "-l", "127.0.0.1", "-m", "47000", "-M", "47998", "-d", "ERR"]

    def real(port: int) -> list[str]:
        return [args.rtpproxy, *common, "-s", f"udp:127.0.0.1:{port}"]

    def ours(port: int) -> list[str]:
        return [*args.pyrtpproxy.split(), *common, "--analyze", "-s", f"udp:127.0.0.1:{port}"]

    results = {}
    bad = 0
    for name, zmod, pkts in scenarios():
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        r = run_scenario(real, name, zmod, pkts)
        p = run_scenario(ours, name, zmod, pkts)
        results[name] = {"rtpproxy": r, "pyrtpproxy": p}
        print(f"== {name} {zmod}")
        for k in COUNTERS.split():
            mark = "" if r["Q"][k] == p["Q"][k] else "   <-- DIFFERS"
            bad += bool(mark)
            print(f"  Q {k:14s} rtpproxy={r['Q'][k]:>12s} pyrtpproxy={p['Q'][k]:>12s}{mark}")
        for k in TIMING.split():
            print(f"  Q {k:14s} rtpproxy={r['Q'][k]:>12s} pyrtpproxy={p['Q'][k]:>12s}")
        for k in GNAMES.split():
            mark = "" if r["G"][k] == p["G"][k] else "   <-- DIFFERS"
            bad += bool(mark)
            print(f"  G {k:22s} rtpproxy={r['G'][k]:>8s} pyrtpproxy={p['G'][k]:>8s}{mark}")
        same = r["out"] == p["out"]
        bad += not same
        print(
            f"  out: {len(r['out'])} vs {len(p['out'])} packets, sizes "
            f"{sorted(set(x[0] for x in r['out']))} vs {sorted(set(x[0] for x in p['out']))}"
            + ("" if same else "   <-- DIFFERS (len, seq, ts)")
        )
        if not same:
            print("    rtpproxy  :", r["out"][:12])
            print("    pyrtpproxy:", p["out"][:12])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"{bad} differences in exact fields")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
