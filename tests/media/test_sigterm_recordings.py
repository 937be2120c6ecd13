"""SIGTERM with 50 recording calls: every recording file is complete and
readable by the extract tool.

A real ``python -m pyrtpproxy`` process records 50 calls (both directions,
spooled with -S, moved to -r at close).  Each call first exchanges packets
that are checked on arrival; then a thread keeps every call sending while
the relay gets SIGTERM.  After it exits (0): the spool is empty, each call
has its four files, every RTP file parses to its end (no cut record) and
holds the checked packets followed, in order, by some of the later ones,
and pyrtpproxy-extract turns each call into a WAV at least as long as the
checked packets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave

from relayutil import rtp_packet

from pyrtpproxy.formats import recfmt
from pyrtpproxy.tools import extract

NCALLS = 50
CHECKED = 30  # packets each way per call, checked on arrival, before the signal
PORT_MIN, PORT_MAX = 32000, 32398  # 200 pairs, below the ephemeral ports


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(addr, text: str, timeout: float = 10.0) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        deadline = time.monotonic() + timeout
        cookie = f"k{time.monotonic_ns()}"
        while time.monotonic() < deadline:
            s.sendto(f"{cookie} {text}".encode(), addr)
            try:
                data = s.recv(65535).decode()
            except (TimeoutError, ConnectionRefusedError):
                continue
            c, _, reply = data.partition(" ")
            if c == cookie:
                return reply.strip()
        raise TimeoutError(text)


def pkt(call: int, direction: int, seq: int) -> bytes:
    return rtp_packet(0x5000 + 2 * call + direction, seq, bytes([(call * 7 + seq) & 0x7F]) * 160)


class Sender(threading.Thread):
    """Keeps every call sending both ways until the relay is gone."""

    def __init__(self, calls) -> None:
        super().__init__(daemon=True)
        self.calls = calls
        self.stop = threading.Event()
        self.seq = CHECKED

    def run(self) -> None:
        while not self.stop.is_set():
            for i, (a, b, pa, pb) in enumerate(self.calls):
                try:
                    a.sendto(pkt(i, 0, self.seq), ("127.0.0.1", pa))
                    b.sendto(pkt(i, 1, self.seq), ("127.0.0.1", pb))
                except OSError:
                    pass  # the relay's ports are gone
            self.seq += 1
            time.sleep(0.002)


def test_sigterm_with_50_recording_calls(tmp_path):
    rd, sd = tmp_path / "rec", tmp_path / "spool"
    rd.mkdir()
    sd.mkdir()
    port = free_udp_port()
    addr = ("127.0.0.1", port)
    argv = [
        sys.executable, "-m", "pyrtpproxy", "-f", "-F",
        "-s", f"udp:127.0.0.1:{port}", "-l", "127.0.0.1",
        "-m", str(PORT_MIN), "-M", str(PORT_MAX),
        "-p", str(tmp_path / "pid"), "-r", str(rd), "-S", str(sd), "-d", "INFO",
    ]  # fmt: skip
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    socks: list[socket.socket] = []
    sender = None
    try:
        assert ctl(addr, "V", timeout=20) == "20040107"
        calls = []
        for i in range(NCALLS):
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for x in (a, b):
                x.bind(("127.0.0.1", 0))
                x.settimeout(5)
                socks.append(x)
            pb = int(ctl(addr, f"U rec{i} 127.0.0.1 {a.getsockname()[1]} fA;1").split()[0])
            pa = int(ctl(addr, f"L rec{i} 127.0.0.1 {b.getsockname()[1]} fA;1 tB;1").split()[0])
            assert ctl(addr, f"R rec{i} fA tB") == "0" and ctl(addr, f"R rec{i} tB fA") == "0"
            calls.append((a, b, pa, pb))
        for seq in range(CHECKED):
            for i, (a, b, pa, pb) in enumerate(calls):
                a.sendto(pkt(i, 0, seq), ("127.0.0.1", pa))
                assert b.recv(2048) == pkt(i, 0, seq)
                b.sendto(pkt(i, 1, seq), ("127.0.0.1", pb))
                assert a.recv(2048) == pkt(i, 1, seq)
        sender = Sender(calls)
        sender.start()
        while sender.seq < CHECKED + 20:  # media in flight when the signal comes
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if sender is not None:
            sender.stop.set()
            sender.join(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        for x in socks:
            x.close()
    assert os.listdir(sd) == []  # every spooled file was moved
    inflight = 0
    names = sorted(os.listdir(rd))
    assert len(names) == 4 * NCALLS, names
    for i in range(NCALLS):
        base = rd / f"rec{i}=fA"
        for side, direction in (("o", 0), ("a", 1)):
            rec = recfmt.read_file(f"{base}.{side}.rtp")
            assert not rec.truncated
            data = [p.data for p in rec.packets]
            assert data[:CHECKED] == [pkt(i, direction, s) for s in range(CHECKED)]
            later = [int.from_bytes(d[2:4], "big") for d in data[CHECKED:]]
            assert later == sorted(set(later)) and all(CHECKED <= s for s in later)
            assert all(d == pkt(i, direction, s) for d, s in zip(data[CHECKED:], later))
            inflight += len(later)
            assert not recfmt.read_file(f"{base}.{side}.rtcp").truncated
        out = tmp_path / f"rec{i}.wav"
        assert extract.main([str(base), str(out)]) == 0
        with wave.open(str(out)) as w:
            assert w.getnframes() >= CHECKED * 160
    print(f"recorded after the checked packets, up to the signal: {inflight}")
    assert inflight > 0  # the signal did come with media in flight
    text = (tmp_path / "log").read_text()
    assert "got signal 15" in text and "rtpproxy ended" in text
