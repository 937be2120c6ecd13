#!/usr/bin/env python3
"""Reply latency of ``--mediaproxy`` (OpenSIPS's mediaproxy module protocol).

OpenSIPS gives the relay ``mediaproxy_timeout`` (500 ms) per request, and one
late reply costs that OpenSIPS process 10 s without media relaying, so the
figure that matters is the tail of the reply latency under load.

Starts the relay as a separate process (``python -m pyrtpproxy --mediaproxy
unix:...``), sets up ``--media`` calls whose both sides send 172-byte RTP at
50 packets/s for the whole run (background load), then runs ``--calls`` calls
on each of ``--connections`` persistent connections (one thread each, one
request at a time, as OpenSIPS processes do): INVITE update, 200 update,
re-INVITE update, its 200, remove.  Prints the request rate and the latency
p50 / p99 / max (and JSON with ``--json``).

    .venv/bin/python bench/mediaproxy_latency.py [--connections 8] [--calls 250] [--media 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time


def update(typ: str, cid: str, cseq: int, ft: str, tt: str, port: int) -> bytes:
    return (
        f"update\r\ntype: {typ}\r\ndialog_id: 1\r\ncall_id: {cid}\r\ncseq: {cseq}\r\nfrom_uri: a@bench\r\n"
        f"to_uri: b@bench\r\nfrom_tag: {ft}\r\nto_tag: {tt}\r\nuser_agent: bench\r\nsignaling_ip: 127.0.0.1\r\n"
        f"media_relay: \r\nmedia: audio:127.0.0.1:{port}:sendrecv:ice=no\r\n\r\n"
    ).encode()


def remove(cid: str) -> bytes:
    return f"remove\r\ncall_id: {cid}\r\nfrom_tag: A\r\nto_tag: B\r\n\r\n".encode()


class Client:
    def __init__(self, path: str, timeout: float) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)

    def ask(self, data: bytes) -> tuple[bytes, float]:
        t0 = time.perf_counter()
        self.s.sendall(data)
        buf = b""
        while not buf.endswith(b"\r\n"):
            chunk = self.s.recv(8192)
            if not chunk:
                raise ConnectionError("relay closed the connection")
            buf += chunk
        return buf, time.perf_counter() - t0

    def close(self) -> None:
        self.s.close()


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the relay exited with status {proc.returncode}")
        try:
            c = Client(path, 1.0)
            c.ask(b"version\r\n")
            c.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the relay did not start listening")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--calls", type=int, default=250, help="calls per connection")
    ap.add_argument("--media", type=int, default=20, help="background calls carrying media")
    ap.add_argument("--port-min", type=int, default=20000)
    ap.add_argument("--port-max", type=int, default=29999)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="pyrtpp-mpbench-")
    path = os.path.join(tmp, "dispatcher.sock")
    cmd = shlex.split(os.environ.get("RELAY", f"{sys.executable} -m pyrtpproxy"))
    cmd += ["-f", "-F", "--mediaproxy", f"unix:{path}", "--mediaproxy-mi", "none", "-l", "127.0.0.1"]
    cmd += ["-m", str(args.port_min), "-M", str(args.port_max), "-d", "ERR", "-p", os.path.join(tmp, "pid")]
    log = open(os.path.join(tmp, "relay.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    media: list[tuple[socket.socket, int, socket.socket, int]] = []
    try:
        wait_for(path, proc)
        c0 = Client(path, 5.0)
        for i in range(args.media):
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            r1, _ = c0.ask(update("request", f"m{i}", 1, "A", "", a.getsockname()[1]))
            r2, _ = c0.ask(update("reply", f"m{i}", 1, "A", "B", b.getsockname()[1]))
            media.append((a, int(r2.split()[1]), b, int(r1.split()[1])))

        def pump() -> None:
            pkt = bytearray(struct.pack("!BBHII", 0x80, 0, 0, 0, 0x1234) + b"\xd5" * 160)
            seq = 0
            nxt = time.perf_counter()
            while not stop.is_set():
                seq += 1
                pkt[2:4] = struct.pack("!H", seq & 0xFFFF)
                for a, ap_, b, bp in media:
                    a.sendto(pkt, ("127.0.0.1", ap_))
                    b.sendto(pkt, ("127.0.0.1", bp))
                nxt += 0.02
                d = nxt - time.perf_counter()
                if d > 0:
                    time.sleep(d)

        def drain() -> None:
            for a, _, b, _ in media:
                a.setblocking(False)
                b.setblocking(False)
            while not stop.is_set():
                for a, _, b, _ in media:
                    for s in (a, b):
                        try:
                            while True:
                                s.recv(2048)
                        except BlockingIOError:
                            pass
                time.sleep(0.005)

        bg = [threading.Thread(target=pump, daemon=True), threading.Thread(target=drain, daemon=True)]
        for t in bg:
            t.start()
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            c = Client(path, 5.0)
            mine = []
            try:
                for i in range(args.calls):
                    cid = f"c{k}-{i}"
                    for data in (
                        update("request", cid, 1, "A", "", 40000),
                        update("reply", cid, 1, "A", "B", 40002),
                        update("request", cid, 2, "A", "B", 40000),
                        update("reply", cid, 2, "A", "B", 40002),
                        remove(cid),
                    ):
                        reply, dt = c.ask(data)
                        mine.append(dt)
                        if reply.startswith(b"error"):
                            with lock:
                                errors.append(cid)
            finally:
                c.close()
                with lock:
                    lat.extend(mine)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for a, _, b, _ in media:
            a.close()
            b.close()
        log.close()
    lat.sort()

    def q(p: float) -> float:
        return lat[int(p * (len(lat) - 1))] * 1000 if lat else 0.0

    result = {
        "requests": len(lat),
        "connections": args.connections,
        "media_calls": args.media,
        "seconds": round(elapsed, 3),
        "rate": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(q(0.5), 3),
        "p99_ms": round(q(0.99), 3),
        "max_ms": round(lat[-1] * 1000, 3) if lat else 0.0,
        "over_500ms": sum(1 for x in lat if x > 0.5),
        "errors": len(errors),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['requests']} requests on {args.connections} connections in {result['seconds']} s "
            f"({result['rate']}/s), {args.media} calls of background media (2 x 50 pps each); latency ms "
            f"p50 {result['p50_ms']} p99 {result['p99_ms']} max {result['max_ms']}; "
            f"{result['over_500ms']} over 500 ms; {result['errors']} errors"
        )
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
