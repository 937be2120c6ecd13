"""Fixtures for the Kamailio compat tests.

Each `stack` fixture instance starts, on 127.0.0.1 with ports picked at run
time:

* pyrtpproxy (`python -m pyrtpproxy`, or the command in $COMPAT_RELAY, e.g.
  COMPAT_RELAY=/usr/bin/rtpproxy to run the same checks against the C
  rtpproxy) with two control sockets: the one Kamailio uses (udp: or unix:)
  and an extra udp: one for the tests;
* Kamailio (Debian's package and its rtpproxy module) with
  compat-tests/kamailio.cfg, pointed at the first socket.

Environment: COMPAT_RELAY (relay command), COMPAT_LOG_LEVEL (the relay's -d,
default INFO), COMPAT_KEEP=1 (keep the logs in /tmp/pyrtpp-compat-* even when
everything passed; they are always kept after a failure).

The `media_stack` fixture is the same stack with the relay's media
features on (used by test_kamailio_playback.py / test_kamailio_recording.py):
pyrtpproxy gets `--prompt-dir <tmp>/prompts` (not when COMPAT_RELAY is set:
rtpproxy has no such flag), `-r <tmp>/rec -S <tmp>/spool` and, for the
"-pcap" variant, `-P`; Kamailio gets `-A 'PROMPT="<tmp>/prompts/tone"'`, the
prompt its INFO handler plays (the tests write tone.0 / tone.8 there).

Kamailio is started only once the relay answers `V` on both sockets: it
probes the relay in child_init and disables one that does not answer.
"""

from __future__ import annotations

import glob
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KAMAILIO_CFG = HERE / "kamailio.cfg"
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 20.0  # s, for each process to become ready
STOP_TIMEOUT = 5.0  # s, between SIGTERM and SIGKILL

# name -> (rtpproxy_sock scheme, use rtpproxy_manage())
VARIANTS = {
    "udp": ("udp", False),
    "unix": ("unix", False),
    "unix-manage": ("unix", True),
}

# media_stack variants: name -> (VARIANTS key, record in pcap format (-P))
MEDIA_VARIANTS = {
    "udp-adhoc": ("udp", False),
    "unix-manage-pcap": ("unix-manage", True),
}


# ---------------------------------------------------------------------------
# Finding Kamailio
# ---------------------------------------------------------------------------


def find_kamailio() -> tuple[str | None, str | None]:
    """(kamailio binary, directory holding rtpproxy.so), None where missing."""
    exe = shutil.which("kamailio")
    if exe is None:
        for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio"):
            if os.access(p, os.X_OK):
                exe = p
                break
    mods = None
    for pattern in (
        "/usr/lib/*/kamailio/modules/rtpproxy.so",
        "/usr/lib/kamailio/modules/rtpproxy.so",
        "/usr/lib64/kamailio/modules/rtpproxy.so",
        "/usr/local/lib*/kamailio/modules/rtpproxy.so",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            mods = os.path.dirname(found[0])
            break
    return exe, mods


@pytest.fixture(scope="session")
def kamailio_install() -> tuple[str, str]:
    exe, mods = find_kamailio()
    if exe and mods:
        return exe, mods
    what = "kamailio" if not exe else "Kamailio's rtpproxy module (rtpproxy.so)"
    if os.geteuid() != 0:
        pytest.skip(f"{what} is not installed (apt-get install kamailio, or run `make test` as root)")
    pytest.fail(f"{what} is not installed; `make test` installs it (apt-get install kamailio)")


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def relay_command() -> list[str]:
    env = os.environ.get("COMPAT_RELAY")
    if env:
        return shlex.split(env)
    return [sys.executable, "-m", "pyrtpproxy"]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def udp_control(addr: tuple[str, int], command: str, timeout: float = 5.0) -> str:
    """Send one command with a cookie over UDP; return the reply without it.
    Resends every 0.5 s (same cookie) until `timeout`."""
    cookie = f"t{random.randrange(1 << 30)}"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {command!r} from udp:{addr[0]}:{addr[1]} within {timeout} s")
            s.send(f"{cookie} {command}".encode())
            s.settimeout(min(0.5, left))
            try:
                while True:
                    data = s.recv(65535)
                    head, _, rest = data.decode("utf-8", "replace").partition(" ")
                    if head == cookie:
                        return rest.rstrip("\n")
            except (TimeoutError, ConnectionRefusedError):
                # nothing yet / port closed: wait a little, then send again
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue


def unix_control(path: str, command: str, timeout: float = 5.0) -> str:
    """One command over a stream unix socket, the way Kamailio does it:
    no cookie, no newline, one read of the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode())
        return s.recv(256).decode("utf-8", "replace").rstrip("\n")


def stop_process(proc: subprocess.Popen, group: bool = False) -> int | None:
    """SIGTERM by pid, then SIGKILL after STOP_TIMEOUT.  With group=True the
    signals go to the process group led by proc (Kamailio's children)."""
    if proc.poll() is not None:
        return proc.returncode

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
    finally:
        if group:  # children that outlived the leader
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------


class Stack:
    """pyrtpproxy + Kamailio on loopback, for one variant."""

    def __init__(self, variant: str, tmpdir: Path, media: bool = False, pcap: bool = False):
        scheme, manage = VARIANTS[variant]
        self.variant = variant
        self.manage = manage
        self.tmpdir = tmpdir
        # media=True: prompts (--prompt-dir), recording (-r/-S, -P with pcap)
        self.media = media
        self.pcap = pcap
        self.prompt_dir = tmpdir / "prompts"
        self.prompt = self.prompt_dir / "tone"  # Kamailio's PROMPT: files tone.<pt>
        self.record_dir = tmpdir / "rec"
        self.spool_dir = tmpdir / "spool"
        if media:
            for d in (self.prompt_dir, self.record_dir, self.spool_dir):
                d.mkdir()
        # Media port range: below Linux's ephemeral range (32768-60999), so
        # the user agents' own RTP ports (bound to port 0) never fall in it.
        self.port_min = 2 * random.randrange(10000, 15000)  # even
        self.port_max = self.port_min + 999  # odd: RTP ports up to port_max - 1
        if scheme == "udp":
            self.relay_url = f"udp:{LOOPBACK}:{free_port()}"
        else:
            self.relay_url = f"unix:{tmpdir}/rtpproxy.sock"
        self.extra_ctl = (LOOPBACK, free_port())
        self.sip_addr = (LOOPBACK, free_port())
        self.relay_log = tmpdir / "relay.log"
        self.kamailio_log = tmpdir / "kamailio.log"
        self.relay: subprocess.Popen | None = None
        self.kamailio: subprocess.Popen | None = None

    # -- control -------------------------------------------------------------
    def control(self, command: str, timeout: float = 5.0) -> str:
        """A command on the tests' own control socket (udp, with a cookie)."""
        return udp_control(self.extra_ctl, command, timeout)

    def relay_control(self, command: str, timeout: float = 5.0) -> str:
        """A command on the socket Kamailio uses."""
        scheme, _, rest = self.relay_url.partition(":")
        if scheme == "udp":
            host, _, port = rest.rpartition(":")
            return udp_control((host, int(port)), command, timeout)
        return unix_control(rest, command, timeout)

    def logs(self) -> list[tuple[str, Path]]:
        return [("relay", self.relay_log), ("kamailio", self.kamailio_log)]

    def describe(self) -> str:
        media = (
            f" prompt={self.prompt} rec={self.record_dir} spool={self.spool_dir} pcap={self.pcap}"
            if self.media
            else ""
        )
        return (
            f"variant={self.variant} rtpproxy_sock={self.relay_url} extra=udp:{self.extra_ctl[0]}:"
            f"{self.extra_ctl[1]} sip={self.sip_addr} ports={self.port_min}-{self.port_max}{media}"
        )

    # -- start/stop ------------------------------------------------------------
    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            out.write(("$ " + shlex.join(argv) + "\n").encode())
            out.flush()
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                start_new_session=True,
            )

    def _wait(self, proc: subprocess.Popen, log: Path, what: str, probe) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with status {proc.returncode} during start-up:\n" + log_tail(log)
                )
            try:
                if probe(min(0.5, max(0.05, deadline - time.monotonic()))):
                    return
            except (OSError, TimeoutError, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} not ready within {START_TIMEOUT} s (last error: {last!r}):\n" + log_tail(log)
                )
            time.sleep(0.05)

    def start_relay(self) -> None:
        argv = relay_command() + [
            "-f",
            "-F",
            "-s",
            self.relay_url,
            "-s",
            f"udp:{self.extra_ctl[0]}:{self.extra_ctl[1]}",
            "-l",
            LOOPBACK,
            "-m",
            str(self.port_min),
            "-M",
            str(self.port_max),
            "-p",
            str(self.tmpdir / "rtpproxy.pid"),
            "-d",
            os.environ.get("COMPAT_LOG_LEVEL", "INFO"),
        ]
        if self.media:
            if not os.environ.get("COMPAT_RELAY"):
                argv += ["--prompt-dir", str(self.prompt_dir)]
            argv += ["-r", str(self.record_dir), "-S", str(self.spool_dir)]
            if self.pcap:
                argv.append("-P")
        self.relay = self._spawn(argv, self.relay_log)

        def probe(t: float) -> bool:
            for send in (self.control, self.relay_control):
                reply = send("V", t)
                if reply != "20040107":
                    raise ValueError(f"V answered {reply!r}")
            return True

        self._wait(self.relay, self.relay_log, "the relay", probe)

    def start_kamailio(self, exe: str, mods: str) -> None:
        # The SIP port is picked free, then bound by Kamailio a moment later:
        # another process's port-0 bind can take it in between. Pick again.
        for attempt in range(3):
            try:
                self._start_kamailio(exe, mods)
                return
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in log_tail(self.kamailio_log):
                    raise
                self.sip_addr = (LOOPBACK, free_port())

    def _start_kamailio(self, exe: str, mods: str) -> None:
        argv = [
            exe,
            "-DD",
            "-E",
            "-f",
            str(KAMAILIO_CFG),
            "-L",
            mods,
            "-Y",
            str(self.tmpdir),
            "-w",
            str(self.tmpdir),
            "-P",
            str(self.tmpdir / "kamailio.pid"),
            "-m",
            "32",
            "-M",
            "4",
            "-l",
            f"udp:{self.sip_addr[0]}:{self.sip_addr[1]}",
            "-A",
            f'RTPPROXY_SOCK="{self.relay_url}"',
        ]
        if self.manage:
            argv += ["-A", "WITH_MANAGE"]
        if self.media:
            argv += ["-A", f'PROMPT="{self.prompt}"']
        self.kamailio = self._spawn(argv, self.kamailio_log)
        self._wait(self.kamailio, self.kamailio_log, "kamailio", self._options_ping)

    def _options_ping(self, timeout: float) -> bool:
        callid = f"ping-{random.randrange(1 << 30)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            uri = f"sip:{self.sip_addr[0]}:{self.sip_addr[1]}"
            msg = (
                f"OPTIONS {uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK{callid};rport\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:probe@{LOOPBACK}:{port}>;tag=p1\r\n"
                f"To: <{uri}>\r\n"
                f"Call-ID: {callid}\r\n"
                f"CSeq: 1 OPTIONS\r\n"
                f"Content-Length: 0\r\n\r\n"
            )
            s.sendto(msg.encode(), self.sip_addr)
            s.settimeout(timeout)
            try:
                while True:
                    data = s.recv(65535).decode("utf-8", "replace")
                    if callid in data:
                        return data.startswith("SIP/2.0 200")
            except TimeoutError:
                return False

    def stop(self) -> None:
        if self.kamailio is not None:
            stop_process(self.kamailio, group=True)
        if self.relay is not None:
            rc = stop_process(self.relay)
            with open(self.relay_log, "a") as f:
                f.write(f"[compat-tests: relay exit status after SIGTERM: {rc}]\n")


@pytest.fixture(scope="module", params=list(VARIANTS))
def stack(request, kamailio_install):
    yield from _run_stack(request, kamailio_install, request.param)


@pytest.fixture(scope="session", params=list(MEDIA_VARIANTS))
def media_stack(request, kamailio_install):
    """A stack whose relay can play prompts and record (see the module doc).
    Session-scoped: the playback and recording tests share it."""
    variant, pcap = MEDIA_VARIANTS[request.param]
    yield from _run_stack(request, kamailio_install, variant, media=True, pcap=pcap)


def _run_stack(request, kamailio_install, variant: str, **options):
    exe, mods = kamailio_install
    tmpdir = Path(tempfile.mkdtemp(prefix="pyrtpp-compat-"))
    st = Stack(variant, tmpdir, **options)
    failed_before = request.session.testsfailed
    try:
        st.start_relay()
        st.start_kamailio(exe, mods)
    except BaseException:
        st.stop()
        print(f"\ncompat-tests: logs kept in {tmpdir}", file=sys.stderr)
        raise
    yield st
    st.stop()
    if request.session.testsfailed == failed_before and not os.environ.get("COMPAT_KEEP"):
        shutil.rmtree(tmpdir, ignore_errors=True)
    else:
        print(f"\ncompat-tests: logs kept in {tmpdir}", file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    st = funcargs.get("stack") or funcargs.get("media_stack")
    if rep.failed and isinstance(st, Stack):
        rep.sections.append(("compat stack", st.describe()))
        for name, path in st.logs():
            rep.sections.append((f"{name} log (last lines, {path})", log_tail(path)))
