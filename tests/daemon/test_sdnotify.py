"""sd_notify (READY/STATUS/STOPPING) against a real datagram socket, and a
process started the way rtpproxy.service + rtpproxy.socket start it
(``-f -s systemd:`` with LISTEN_FDS/LISTEN_PID and NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import trio
from relayutil import Relay, settings

from pyrtpproxy.daemon import control
from pyrtpproxy.daemon.app import Server, _main
from pyrtpproxy.daemon.sdnotify import SdNotify, attach_sdnotify

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def dgram(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    return s


def fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n") if line)


# ---------------------------------------------------------------- unit
def test_disabled_without_notify_socket():
    sd = SdNotify({})
    assert not sd.enabled
    assert sd.send("READY=1") is False
    sd.ready("x")  # no-op, no error
    assert SdNotify({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_messages_over_a_datagram_socket(tmp_path):
    rx = dgram(tmp_path / "notify")
    sd = SdNotify({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert sd.enabled
    sd.ready("serving: 0 active sessions")
    assert fields(rx.recv(4096)) == {"READY": "1", "STATUS": "serving: 0 active sessions"}
    sd.ready("again")  # once only
    sd.status("serving: 0 active sessions")  # unchanged: not sent
    sd.status("serving: 1 active session")
    assert fields(rx.recv(4096)) == {"STATUS": "serving: 1 active session"}
    sd.stopping("draining")
    assert fields(rx.recv(4096)) == {"STOPPING": "1", "STATUS": "draining"}
    sd.stopping()  # once only
    sd.send("STATUS=Exited")
    assert rx.recv(4096) == b"STATUS=Exited"
    sd.close()
    rx.close()


def test_abstract_namespace_socket():
    name = f"pyrtpproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(b"\0" + name.encode())
    rx.settimeout(10)
    sd = SdNotify({"NOTIFY_SOCKET": "@" + name})
    assert sd.send("READY=1")
    assert rx.recv(100) == b"READY=1"
    sd.close()
    rx.close()


def test_a_missing_listener_is_not_an_error(tmp_path):
    sd = SdNotify({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert sd.send("READY=1") is False  # logged at debug, ignored


# ---------------------------------------------------------------- in process
async def test_server_life_cycle(nursery, autojump_clock, tmp_path):
    raw_path = str(tmp_path / "notify")
    rx = trio.socket.from_stdlib_socket(dgram(raw_path))

    async def recv() -> dict[str, str]:
        with trio.fail_after(60):
            return fields(await rx.recv(4096))

    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    server = Server(settings(), [b])
    sd = attach_sdnotify(server, {"NOTIFY_SOCKET": raw_path}, interval=1.0)
    assert sd is not None
    done = trio.Event()

    async def main() -> None:
        await _main(server)  # the CLI's serving coroutine: announces "ready"
        done.set()

    nursery.start_soon(main)
    msg = await recv()
    assert msg == {"READY": "1", "STATUS": "serving: 0 active sessions, 0 created, 0 timed out"}
    relay = Relay(server, b.sockname)
    await relay.cmd("U s1 127.0.0.1 30000 f")
    assert await recv() == {"STATUS": "serving: 1 active session, 1 created, 0 timed out"}
    server.drain()  # SIGHUP
    assert await recv() == {"STOPPING": "1", "STATUS": "draining: 1 active session, 1 created, 0 timed out"}
    assert await relay.cmd("D s1 f") == "0"  # last session gone: the server stops
    assert await recv() == {"STATUS": "draining: 0 active sessions, 1 created, 0 timed out"}
    assert await recv() == {"STATUS": "Exited"}
    with trio.fail_after(10):
        await done.wait()
    rx.close()


# ---------------------------------------------------------------- a real process
LAUNCH = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "pyrtpproxy"] + sys.argv[2:])
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_socket_activated_notify_service(tmp_path):
    """What systemd does for rtpproxy.socket + rtpproxy.service."""
    ctl_path = tmp_path / "rtpproxy.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(ctl_path))
    lsock.listen(8)
    rx = dgram(tmp_path / "notify")
    mport = free_tcp_port()
    base = 46000 + os.getpid() % 50 * 40
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), PYTHONPATH=str(ROOT))
    args = [
        "-f",
        "-F",
        "-s",
        "systemd:",
        "-p",
        "/dev/null",
        "-d",
        "INFO",
        "-l",
        "127.0.0.1",
        "-m",
        str(base),
        "-M",
        str(base + 39),
        "-n",
        f"unix:{tmp_path}/timeouts.sock",
        "--metrics",
        f"tcp:127.0.0.1:{mport}",
    ]
    proc = subprocess.Popen(
        [PY, "-c", LAUNCH, str(lsock.fileno()), *args],
        env=env,
        pass_fds=(lsock.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lsock.close()  # the child holds it now
    try:
        ready = fields(rx.recv(4096))
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving: 0 active")
        # commands over the socket systemd passed (stream: one per line)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(ctl_path))
            c.sendall(b"VF 20081224\n")
            assert c.recv(100) == b"1\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            assert b"rtpproxy_sessions_active 0\n" in r.read()
        os.kill(proc.pid, signal.SIGHUP)  # drain; no sessions: exits
        assert fields(rx.recv(4096))["STOPPING"] == "1"
        assert rx.recv(4096) == b"STATUS=Exited"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        rx.close()
    assert "Traceback" not in err, err
