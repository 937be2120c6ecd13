"""Build and drive the RTP load generator processes.

The C generator (``loadgen.c``) is copied into a temporary directory and
compiled there with the system's C compiler; without one, the pure-Python
``loadgen.py`` is used instead (much slower: fine for the smoke test).
Each generator process plays both ends of a shard of the sessions; the
protocol on its stdin/stdout is described at the top of ``loadgen.c``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GenParams:
    nsock: int = 8  # endpoint sockets per side per process
    rcvbuf: int = 8 << 20
    pps: int = 50
    size: int = 172
    warmup_ms: int = 2000
    duration_ms: int = 10000
    tail_ms: int = 300  # keep sending (unmeasured) after the window
    drain_ms: int = 700  # then only receive
    bind_ip: str = "127.0.0.1"
    relay_ip: str = "127.0.0.1"

    def argv(self) -> list[str]:
        return [
            str(x)
            for x in (
                self.nsock,
                self.rcvbuf,
                self.pps,
                self.size,
                self.warmup_ms,
                self.duration_ms,
                self.tail_ms,
                self.drain_ms,
                self.bind_ip,
                self.relay_ip,
            )
        ]


def build(kind: str, workdir: Path) -> tuple[list[str], str]:
    """Return (command prefix, description) of the generator to run.

    ``kind``: "auto" (C when a compiler is found, else Python), "c" or "python".
    """
    if kind in ("auto", "c"):
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc:
            src = workdir / "loadgen.c"
            exe = workdir / "loadgen"
            shutil.copyfile(HERE / "loadgen.c", src)
            cmd = [cc, "-O2", "-o", str(exe), str(src)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                return [str(exe)], f"C (sendmmsg/recvmmsg), {' '.join([Path(cc).name, '-O2'])}"
            if kind == "c":
                raise RuntimeError(f"compiling the generator failed:\n{proc.stderr}")
        elif kind == "c":
            raise RuntimeError("no C compiler found (set CC, or use --generator python)")
    return [sys.executable, str(HERE / "loadgen.py")], "Python fallback (sendto/recvmsg)"


class GenProcess:
    """One generator process: ports, then sessions, then START/END/RESULT."""

    def __init__(self, cmd: list[str], params: GenParams, prefix: list[str]) -> None:
        self.proc = subprocess.Popen(
            prefix + cmd + params.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        line = self._readline()
        if not line.startswith("PORTS "):
            self.kill()
            raise RuntimeError(f"generator did not start: {line!r} {self.proc.stderr.read()!r}")
        a, b = line[6:].strip().split(";")
        self.ports_a = [int(x) for x in a.split(",")]
        self.ports_b = [int(x) for x in b.split(",")]
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.result: dict | None = None

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"generator exited: {self.proc.stderr.read()!r}")
        return line

    def go(self, sessions: list[tuple[int, int, int, int, int]]) -> None:
        """``sessions``: (sid, ia, ib, port_a, port_b), sids dense and ascending."""
        lines = [str(len(sessions))] + [" ".join(map(str, s)) for s in sessions]
        self.proc.stdin.write("\n".join(lines) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, word: str) -> int:
        while True:
            line = self._readline()
            if line.startswith(word + " "):
                value = line[len(word) + 1 :].strip()
                if word == "RESULT":
                    self.result = json.loads(value)
                    return 0
                return int(value)

    def finish(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


class Generators:
    """``nproc`` generator processes sharing the sessions between them."""

    def __init__(self, cmd: list[str], params: GenParams, nproc: int, prefix: list[str]) -> None:
        self.params = params
        self.procs: list[GenProcess] = []
        try:
            for _ in range(nproc):
                self.procs.append(GenProcess(cmd, params, prefix))
        except BaseException:
            self.kill()
            raise

    def endpoints(self, n: int) -> list[tuple[int, int, int, int]]:
        """For session i: (process, socket index, A port, B port)."""
        out = []
        np_ = len(self.procs)
        for i in range(n):
            p = i * np_ // n  # contiguous blocks: each process gets dense session ids
            g = self.procs[p]
            k = i % len(g.ports_a)
            out.append((p, k, g.ports_a[k], g.ports_b[k]))
        return out

    def go(self, shards: list[list[tuple[int, int, int, int, int]]]) -> None:
        for g, sessions in zip(self.procs, shards):
            g.go(sessions)

    def wait_start(self) -> None:
        for g in self.procs:
            g.start_ns = g.wait_for("START")

    def wait_end(self) -> None:
        for g in self.procs:
            g.end_ns = g.wait_for("END")

    def results(self, timeout: float) -> list[dict]:
        out: list[dict] = []
        errors: list[BaseException] = []

        def collect(g: GenProcess) -> None:
            try:
                g.wait_for("RESULT")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=collect, args=(g,), daemon=True) for g in self.procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        for g in self.procs:
            g.finish(5)
            if g.result is None:
                errors.append(RuntimeError("generator gave no result"))
            else:
                out.append(g.result)
        if errors:
            raise errors[0]
        return out

    def kill(self) -> None:
        for g in self.procs:
            g.kill()
