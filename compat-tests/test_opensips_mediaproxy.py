"""OpenSIPS 3.4's mediaproxy module driving pyrtpproxy (--mediaproxy).

A real OpenSIPS (an ``opensips`` binary on PATH, with the modules mediaproxy,
dialog, mi_datagram, tm, sl, rr, maxfwd, sipmsgops and signaling) runs
compat-tests/opensips-mediaproxy.cfg, an unchanged MediaProxy configuration:
``engage_media_proxy()`` for calls to ``b@``, ``use_media_proxy()`` /
``end_media_session()`` for calls to ``u@``.  pyrtpproxy listens on the
module's unix socket and on OpenSIPS's MI datagram socket side
(``--mediaproxy-mi``).  The same SIP user agents as the Kamailio tests place
the calls; the checks are theirs:

* every SDP a side receives carries the relay's address and an even port of
  the relay's -m/-M range;
* RTP from each side arrives at the other, byte for byte, from the relay port
  the receiver was given (symmetric relaying), packet by packet;
* re-INVITEs from either side keep the ports;
* BYE from either side removes the call (the relay's ``sessions`` is empty
  and the ports are free);
* 5 concurrent calls;
* when the media stops, the relay ends the dialog over OpenSIPS's MI:
  OpenSIPS sends BYE to both user agents.

OpenSIPS is not in Debian 12: the tests are skipped when no ``opensips``
binary is on PATH.  Its modules are looked for next to the binary (a build
tree: ``modules/<name>/<name>.so``), in the usual install directories, or in
$OPENSIPS_MODULES.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import compat_sip
import pytest
import trio
from compat_sip import UA, SdpMedia, gather
from conftest import LOOPBACK, free_port, log_tail, relay_command, stop_process, udp_control

HERE = Path(__file__).resolve().parent
CFG = HERE / "opensips-mediaproxy.cfg"
MODULES = ("mediaproxy", "dialog", "mi_datagram", "tm", "sl", "rr", "maxfwd", "sipmsgops", "signaling")
START_TIMEOUT = 20.0
PACKETS = 50
CONCURRENT_CALLS = 5
TTL = 8  # the relay's -T/-W: media timeout of the timeout test


def find_opensips() -> tuple[str | None, str | None, str]:
    """(binary, module directory for mpath, why not)."""
    exe = shutil.which("opensips")
    if exe is None:
        for p in ("/usr/sbin/opensips", "/usr/local/sbin/opensips"):
            if os.access(p, os.X_OK):
                exe = p
                break
    if exe is None:
        return None, None, "no opensips binary on PATH (OpenSIPS is not in Debian 12; build 3.4 from source)"
    real = Path(os.path.realpath(exe))
    candidates = [os.environ.get("OPENSIPS_MODULES", ""), str(real.parent / "modules")]
    for pattern in (
        "/usr/lib/*/opensips/modules",
        "/usr/lib/opensips/modules",
        "/usr/local/lib*/opensips/modules",
    ):
        candidates += sorted(str(p) for p in Path("/").glob(pattern.lstrip("/")))
    for d in filter(None, candidates):
        base = Path(d)
        if all((base / f"{m}.so").exists() or (base / m / f"{m}.so").exists() for m in MODULES):
            return exe, str(base) + "/", ""
    return exe, None, f"{exe} found, but not its modules ({', '.join(MODULES)}); set OPENSIPS_MODULES"


@pytest.fixture(scope="session")
def opensips_install() -> tuple[str, str]:
    exe, mods, why = find_opensips()
    if exe is None or mods is None:
        pytest.skip(why)
    return exe, mods


class MPStack:
    """pyrtpproxy (--mediaproxy) + OpenSIPS (mediaproxy module) on loopback."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        self.port_min = 2 * random.randrange(10000, 15000)
        self.port_max = self.port_min + 999
        self.mp_sock = str(tmpdir / "dispatcher.sock")
        self.mi_sock = str(tmpdir / "opensips-mi.sock")
        self.extra_ctl = (LOOPBACK, free_port())
        self.sip_addr = (LOOPBACK, free_port())
        self.relay_log = tmpdir / "relay.log"
        self.opensips_log = tmpdir / "opensips.log"
        self.relay: subprocess.Popen | None = None
        self.opensips: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
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
                raise RuntimeError(f"{what} exited with status {proc.returncode}:\n" + log_tail(log))
            try:
                if probe():
                    return
            except (OSError, TimeoutError, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {START_TIMEOUT} s ({last!r}):\n" + log_tail(log))
            time.sleep(0.05)

    # -- the relay's sockets -----------------------------------------------------
    def mp_query(self, command: str, timeout: float = 5.0) -> str:
        """An operator command on the dispatcher socket (one JSON line back)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.mp_sock)
            s.sendall(command.encode() + b"\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf.decode()

    def sessions(self) -> list:
        return json.loads(self.mp_query("sessions"))

    def start_relay(self) -> None:
        argv = relay_command() + [
            "-f",
            "-F",
            "-s",
            f"udp:{self.extra_ctl[0]}:{self.extra_ctl[1]}",
            "--mediaproxy",
            f"unix:{self.mp_sock}",
            "--mediaproxy-mi",
            f"unix:{self.mi_sock}",
            "-l",
            LOOPBACK,
            "-m",
            str(self.port_min),
            "-M",
            str(self.port_max),
            "-T",
            str(TTL),
            "-W",
            str(TTL),
            "-p",
            str(self.tmpdir / "rtpproxy.pid"),
            "-d",
            os.environ.get("COMPAT_LOG_LEVEL", "INFO"),
        ]
        self.relay = self._spawn(argv, self.relay_log)

        def probe() -> bool:
            return udp_control(self.extra_ctl, "V", 0.5) == "20040107" and self.mp_query("version", 0.5) != ""

        self._wait(self.relay, self.relay_log, "the relay", probe)

    def start_opensips(self, exe: str, mpath: str) -> None:
        cfg = CFG.read_text()
        for k, v in {
            "@SIP_HOST@": self.sip_addr[0],
            "@SIP_PORT@": str(self.sip_addr[1]),
            "@MPATH@": mpath,
            "@MP_SOCK@": self.mp_sock,
            "@MI_SOCK@": self.mi_sock,
        }.items():
            cfg = cfg.replace(k, v)
        path = self.tmpdir / "opensips.cfg"
        path.write_text(cfg)
        argv = [exe, "-F", "-f", str(path), "-P", str(self.tmpdir / "opensips.pid"), "-m", "64", "-M", "8"]
        self.opensips = self._spawn(argv, self.opensips_log)
        self._wait(self.opensips, self.opensips_log, "opensips", self._options_ping)

    def _options_ping(self) -> bool:
        callid = f"ping-{random.randrange(1 << 30)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            uri = f"sip:{self.sip_addr[0]}:{self.sip_addr[1]}"
            msg = (
                f"OPTIONS {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK{callid};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@{LOOPBACK}:{port}>;tag=p1\r\nTo: <{uri}>\r\n"
                f"Call-ID: {callid}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(msg.encode(), self.sip_addr)
            s.settimeout(0.5)
            try:
                while True:
                    data = s.recv(65535).decode("utf-8", "replace")
                    if callid in data:
                        return data.startswith("SIP/2.0 200")
            except TimeoutError:
                return False

    def stop(self) -> None:
        if self.opensips is not None:
            stop_process(self.opensips, group=True)
        if self.relay is not None:
            rc = stop_process(self.relay)
            with open(self.relay_log, "a") as f:
                f.write(f"[compat-tests: relay exit status after SIGTERM: {rc}]\n")


@pytest.fixture(scope="module")
def mpstack(request, opensips_install):
    exe, mpath = opensips_install
    tmpdir = Path(tempfile.mkdtemp(prefix="pyrtpp-opensips-"))
    st = MPStack(tmpdir)
    failed_before = request.session.testsfailed
    try:
        st.start_relay()
        st.start_opensips(exe, mpath)
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
        for name, path in (("relay", st.relay_log), ("opensips", st.opensips_log)):
            print(f"--- {name} log ({path}):\n{log_tail(path)}", file=sys.stderr)


# ---------------------------------------------------------------------------


def check_relay_sdp(st: MPStack, media: SdpMedia, receiver: UA, sender: UA, what: str) -> None:
    ctx = f"{what}: SDP received by {receiver.name}"
    assert media.ip == LOOPBACK, f"{ctx} has c= address {media.ip!r}, not the relay's:\n{media.raw}"
    assert media.port != sender.rtp_port, f"{ctx} still carries {sender.name}'s own port:\n{media.raw}"
    assert st.port_min <= media.port and media.port + 1 <= st.port_max, (
        f"{ctx} has port {media.port}, outside -m {st.port_min} -M {st.port_max}:\n{media.raw}"
    )
    assert media.port % 2 == 0, f"{ctx} has an odd RTP port {media.port}:\n{media.raw}"


async def check_media(a: UA, b: UA, what: str, packets: int = PACKETS) -> None:
    try:
        await compat_sip.check_media(a, b, packets)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


async def call_gone(st: MPStack, call_id: str, ports: list[int], what: str) -> None:
    """Within 2 s the relay no longer has the call and its ports are free."""
    deadline = trio.current_time() + 2
    while True:
        sessions = await trio.to_thread.run_sync(st.sessions)
        left = [s for s in sessions if s["call_id"] == call_id]
        bound = [p for p in ports if not _free(p)]
        if not left and not bound:
            return
        if trio.current_time() > deadline:
            raise AssertionError(
                f"{what}: 2 s after the BYE the relay still has {left} / ports {bound} bound"
            )
        await trio.sleep(0.05)


def _free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((LOOPBACK, p))
            except OSError:
                return False
    return True


async def run_call(
    st: MPStack, *, mode: str, bye_from: str = "A", reinvites: bool = True, label: str = ""
) -> None:
    a = await UA.open("A", st.sip_addr)
    b = await UA.open("U" if mode == "use" else "B", st.sip_addr)  # "u@...": use_media_proxy()
    try:
        ringing = trio.Event()

        def provisional(r):
            if r.status == 180:
                ringing.set()

        (resps, a_sdps), (_inv, b_sdp) = await gather(
            a.invite(b, provisional), b.answer_invite(ringing_seen=ringing)
        )
        call = f"{label}{mode} call {a.call_id}"
        check_relay_sdp(st, b_sdp, b, a, f"{call}, INVITE")
        assert [r.status for r in resps if r.has_sdp] == [180, 200], [r.first_line for r in resps]
        for m in a_sdps:
            check_relay_sdp(st, m, a, b, f"{call}, reply")
        a_port, b_port = a_sdps[-1].port, b_sdp.port
        assert a_sdps[0].port == a_port and a_port != b_port
        await check_media(a, b, f"{call}, after the INVITE")
        if reinvites:
            b2, a2 = await gather(b.answer_reinvite(), a.reinvite())
            assert (b2.port, a2.port) == (b_port, a_port), f"{call}: re-INVITE from A changed the ports"
            a3, b3 = await gather(a.answer_reinvite(), b.reinvite())
            assert (a3.port, b3.port) == (a_port, b_port), f"{call}: re-INVITE from B changed the ports"
            for m, rcv, snd in ((b2, b, a), (a2, a, b), (a3, a, b), (b3, b, a)):
                check_relay_sdp(st, m, rcv, snd, f"{call}, re-INVITE")
            await check_media(a, b, f"{call}, after the re-INVITEs")
        if bye_from == "A":
            await gather(a.bye(), b.answer_bye())
        else:
            await gather(b.bye(), a.answer_bye())
        await call_gone(st, a.call_id, [a_port, b_port], f"{call}, BYE from {bye_from}")
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------


def test_module_connects_to_the_relay(mpstack):
    summary = json.loads(mpstack.mp_query("summary"))
    assert summary[0]["status"] == "active"


@pytest.mark.parametrize("mode", ["engage", "use"])
async def test_call_with_reinvites_bye_from_caller(mpstack, mode):
    with trio.fail_after(60):
        await run_call(mpstack, mode=mode, bye_from="A")


@pytest.mark.parametrize("mode", ["engage", "use"])
async def test_call_bye_from_callee(mpstack, mode):
    with trio.fail_after(60):
        await run_call(mpstack, mode=mode, bye_from="B", reinvites=False)


async def test_concurrent_calls(mpstack):
    with trio.fail_after(90):
        await gather(
            *(
                run_call(mpstack, mode="engage" if i % 2 else "use", bye_from="AB"[i % 2], label=f"#{i} ")
                for i in range(CONCURRENT_CALLS)
            )
        )


async def test_media_timeout_ends_the_dialog(mpstack):
    """No more media: after -T seconds the relay asks OpenSIPS (MI dlg_end_dlg)
    to end the dialog; OpenSIPS sends BYE to both, the module sends remove."""
    a = await UA.open("A", mpstack.sip_addr)
    b = await UA.open("B", mpstack.sip_addr)
    try:
        with trio.fail_after(60):
            ringing = trio.Event()
            (_r, a_sdps), (_inv, b_sdp) = await gather(
                a.invite(b, lambda r: ringing.set() if r.status == 180 else None),
                b.answer_invite(ringing_seen=ringing),
            )
            await check_media(a, b, "timeout call, before the media stops", packets=10)
            # the media stops; OpenSIPS must send BYE to both within TTL + margin
            with trio.fail_after(TTL + 10):
                byes = await gather(a.expect_request("BYE", TTL + 10), b.expect_request("BYE", TTL + 10))
            for ua, bye in zip((a, b), byes):
                await ua.respond(bye, 200, "OK")
            await call_gone(mpstack, a.call_id, [a_sdps[-1].port, b_sdp.port], "timeout call")
        log = mpstack.relay_log.read_text(errors="replace")
        assert "OpenSIPS ended dialog" in log, log_tail(mpstack.relay_log)
        assert "call expired" in log
    finally:
        a.close()
        b.close()
