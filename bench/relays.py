"""The relays under test: how to name them, start them, pin them, stop them.

``--relay`` takes one of:

* ``pyrtpproxy``: this project, run as ``sys.executable -m pyrtpproxy``;
* ``PATH`` or ``LABEL=PATH``: any rtpproxy-compatible binary.  If its file
  name contains ``rtpengine`` it is started as rtpengine in userspace with
  its legacy rtpproxy UDP control (``--listen-udp``); otherwise with
  rtpproxy's own command line.

Every relay listens for control on ``udp:127.0.0.1:PORT`` and allocates
media ports on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .control import ControlClient


@dataclass
class Net:
    """Where the relay runs: loopback (default) or its namespace (``--netns``)."""

    relay_ip: str = "127.0.0.1"
    gen_ip: str = "127.0.0.1"
    relay_prefix: tuple[str, ...] = ()  # nsenter into the relay's namespace


NET = Net()


@dataclass(frozen=True)
class RelaySpec:
    label: str
    kind: str  # "pyrtpproxy" | "rtpproxy" | "rtpengine"
    path: str | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, extra: tuple[str, ...] = ()) -> RelaySpec:
        if text == "pyrtpproxy":
            return cls("pyrtpproxy", "pyrtpproxy", None, extra)
        label, sep, path = text.partition("=")
        if sep and path == "pyrtpproxy":  # a second pyrtpproxy, e.g. with --workers
            return cls(label, "pyrtpproxy", None, extra)
        if not sep:
            path, label = text, Path(text).name
        resolved = shutil.which(path) or path
        if not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
            raise ValueError(f"--relay {text}: {path} is not an executable file")
        kind = "rtpengine" if "rtpengine" in Path(resolved).name else "rtpproxy"
        return cls(label, kind, os.path.abspath(resolved), extra)

    def command(
        self, ctl_port: int, port_min: int, port_max: int, extra_ctl: tuple[str, ...] = ()
    ) -> list[str]:
        """The relay's command line; ``extra_ctl``: more ``-s`` control sockets
        (``unix:PATH``, ``tcp:HOST:PORT``), not for rtpengine."""
        if self.kind == "rtpengine":
            return [
                self.path,
                "--config-file=none",
                "--foreground",
                "--log-stderr",
                "--log-level=3",
                "--table=-1",
                f"--interface={NET.relay_ip}",
                f"--listen-udp={NET.relay_ip}:{ctl_port}",
                f"--port-min={port_min}",
                f"--port-max={port_max}",
                "--num-threads=1",
                *self.extra,
            ]
        exe = [sys.executable, "-m", "pyrtpproxy"] if self.kind == "pyrtpproxy" else [self.path]
        return exe + [
            "-f",
            "-F",
            "-s",
            f"udp:{NET.relay_ip}:{ctl_port}",
            *[a for url in extra_ctl for a in ("-s", url)],
            "-l",
            NET.relay_ip,
            "-m",
            str(port_min),
            "-M",
            str(port_max),
            "-d",
            "ERR",
            *self.extra,
        ]

    def version(self) -> str:
        try:
            if self.kind == "pyrtpproxy":
                import pyrtpproxy

                return (
                    f"pyrtpproxy {getattr(pyrtpproxy, '__version__', '?')} (Python {sys.version.split()[0]})"
                )
            flag = "--version" if self.kind == "rtpengine" else "-V"
            out = subprocess.run([self.path, flag], capture_output=True, text=True, timeout=10)
            text = (out.stdout + out.stderr).strip().splitlines()
            return f"{self.kind} {text[0].replace('Version:', '').strip()}" if text else self.kind
        except (OSError, subprocess.SubprocessError):
            return self.kind


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin_prefix(cpu: int | None) -> list[str]:
    """``taskset -c CPU`` (empty when not pinning)."""
    if cpu is None:
        return []
    ts = shutil.which("taskset")
    if ts is None:
        raise RuntimeError("--pin needs taskset (util-linux)")
    return [ts, "-c", str(cpu)]


@dataclass
class RelayProcess:
    spec: RelaySpec
    argv: list[str]
    ctl_port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls,
        spec: RelaySpec,
        *,
        ctl_port: int,
        port_min: int,
        port_max: int,
        cpu: int | None,
        log_path: Path,
        ready_timeout: float = 20.0,
        extra_ctl: tuple[str, ...] = (),
    ) -> RelayProcess:
        argv = (
            list(NET.relay_prefix) + pin_prefix(cpu) + spec.command(ctl_port, port_min, port_max, extra_ctl)
        )
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
                start_new_session=True,
            )
        finally:
            log.close()
        rp = cls(spec, argv, ctl_port, log_path, proc, psutil.Process(proc.pid))
        try:
            rp._wait_ready(ready_timeout)
        except BaseException:
            rp.stop()
            raise
        return rp

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        c = ControlClient((NET.relay_ip, self.ctl_port), timeout=0.2, retries=0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.spec.label} exited with {self.proc.returncode}; see {self.log_path}"
                    )
                try:
                    if c.cmd("V").startswith("2004"):
                        return
                except TimeoutError:
                    pass
                time.sleep(0.05)
        finally:
            c.close()
        raise RuntimeError(f"{self.spec.label} did not answer V within {timeout} s; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time of the relay and of any processes it started (media workers)."""
        t = self.ps.cpu_times()
        total = t.user + t.system
        try:
            kids = self.ps.children(recursive=True)
        except Exception:
            kids = []
        for k in kids:
            try:
                c = k.cpu_times()
                total += c.user + c.system
            except Exception:
                pass
        return total

    def rss(self) -> int:
        """RSS of the relay plus that of any processes it started (media workers)."""
        total = self.ps.memory_info().rss
        try:
            kids = self.ps.children(recursive=True)
        except Exception:
            kids = []
        for k in kids:
            try:
                total += k.memory_info().rss
            except Exception:
                pass
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; only this relay's own pid."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def udp_drops(port_min: int, port_max: int, pid: int | None = None) -> int:
    """Sum of the kernel's receive-queue drops over UDP sockets bound in the range.

    ``pid``: read that process's network namespace (the relay's, with --netns).
    """
    total = 0
    try:
        with open(f"/proc/{pid}/net/udp" if pid else "/proc/net/udp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) < 13:
                    continue
                ip, _, port = parts[1].partition(":")
                p = int(port, 16)
                if port_min <= p <= port_max:
                    total += int(parts[12])
    except OSError:
        return -1
    return total
