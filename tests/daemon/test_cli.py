"""Command line: getopt forms, defaults, validation messages, exits, logging."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import types

import pytest

import pyrtpproxy
from pyrtpproxy.daemon import cli, logsetup
from pyrtpproxy.daemon.cli import USAGE, build_config, main
from pyrtpproxy.daemon.config import (
    BindAddr,
    BindArg,
    Config,
    ConfigError,
    build_bind_addrs,
    normalise_ports,
    parse_c_int,
)

SUBPROCESS_TIMEOUT = 30


@pytest.fixture(autouse=True)
def not_root(monkeypatch):
    """Run every test as an ordinary user unless it says otherwise."""
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)


@pytest.fixture(autouse=True)
def fake_app(monkeypatch):
    """Stand-in for pyrtpproxy.daemon.app (never run the real one here): records
    the Config it is run with."""
    calls: list[Config] = []
    mod = types.ModuleType("pyrtpproxy.daemon.app")

    def run(config: Config) -> int:
        calls.append(config)
        logging.getLogger("pyrtpproxy.daemon.app").info("fake app ran")
        return 0

    mod.run = run
    monkeypatch.setitem(sys.modules, "pyrtpproxy.daemon.app", mod)
    monkeypatch.setattr(pyrtpproxy, "app", mod, raising=False)
    return calls


def cfg(*args: str) -> Config:
    return build_config(list(args))


def fails(capsys, *args: str) -> str:
    """Run main(args), expect exit 1 and return the stderr text."""
    assert main(list(args)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    return err


# ---------------------------------------------------------------- defaults


def test_defaults():
    c = cfg("-f")
    assert c.control_sockets == ("unix:/var/run/rtpproxy.sock",)
    assert c.bind_addrs == (BindAddr(4, None),)
    assert not c.bridge and c.external is None and c.labelled == ()
    assert (c.port_min, c.port_max) == (35000, 64998)
    assert (c.ttl, c.setup_ttl, c.tos) == (60, 60, 0xB8)
    assert c.pidfile == "/var/run/rtpproxy.pid" and not c.pidfile_explicit
    assert c.log_level == "DBUG" and c.log_facility == "LOG_DAEMON"
    assert c.foreground and not c.no_root_check
    assert c.run_as is None and c.sock_mode is None and c.nofile_limit is None
    assert c.notify_targets == () and c.dso == ()
    assert c.record_dir is None and c.spool_dir is None
    assert not (c.pcap or c.record_all or c.no_rtcp_record or c.independent_ttl)
    assert not (c.force_asymmetric or c.bridge_symmetric or c.sequential_ports)
    assert c.prompt_dir is None and c.metrics is None
    # the class defaults agree with what the parser produces
    assert Config(foreground=True) == c


def test_daemon_default_log_level():
    assert cfg().log_level == "WARN"
    assert cfg("-d", "info").log_level == "INFO"


def test_setup_ttl_follows_ttl():
    assert cfg("-T", "5").setup_ttl == 5
    c = cfg("-W", "10", "-T", "5")
    assert (c.ttl, c.setup_ttl) == (5, 10)


# ---------------------------------------------------------------- getopt forms


def test_combined_flags():
    c = cfg("-fF2iPaRbD")
    assert c.foreground and c.no_root_check and c.dup_small and c.independent_ttl
    assert c.pcap and c.record_all and c.no_rtcp_record and c.sequential_ports and c.no_chdir


def test_attached_arguments_and_operand_permutation():
    c = cfg("-m10000", "-fM", "20000", "-T30")
    assert (c.port_min, c.port_max, c.ttl) == (10000, 19998, 30)


def test_repeated_options():
    c = cfg(
        "-f",
        "-s", "udp:127.0.0.1:22222",
        "-s", "unix:/tmp/rtpp.sock",
        "-n", "tcp:127.0.0.1:9999",
        "-n", "/tmp/notify.sock",
        "-l", "127.0.0.1",
        "-l", "lo2@127.0.0.2",
        "-6", "lo6@::1",
    )  # fmt: skip
    assert c.control_sockets == ("udp:127.0.0.1:22222", "unix:/tmp/rtpp.sock")
    assert c.notify_targets == ("tcp:127.0.0.1:9999", "unix:/tmp/notify.sock")
    assert c.bind_addrs == (
        BindAddr(4, "127.0.0.1"),
        BindAddr(4, "127.0.0.2", label="lo2"),
        BindAddr(6, "::1", label="lo6"),
    )
    assert c.labelled == c.bind_addrs[1:]


def test_last_value_wins():
    c = cfg("-T", "5", "-T", "7", "-d", "INFO:LOG_LOCAL5", "-d", "err")
    assert c.ttl == 7 and c.log_level == "ERR" and c.log_facility == "LOG_LOCAL5"


def test_long_options():
    c = cfg(
        "-f", "--force_asymmetric", "--bridge_symmetric", "--no_resolve",
        "--no_redirect", "--nice", "5", "--overload_prot", "--config", "/etc/r.conf",
        "--dso", "a.so", "--dso=b.so", "--prompt-dir", "/tmp", "--metrics=tcp:127.0.0.1:9100",
    )  # fmt: skip
    assert c.force_asymmetric and c.bridge_symmetric and c.no_resolve and c.no_redirect
    assert c.nice == 5 and c.overload_prot and c.config_file == "/etc/r.conf"
    assert c.dso == ("a.so", "b.so")
    assert c.prompt_dir == "/tmp" and c.metrics == "tcp:127.0.0.1:9100"


def test_long_option_abbreviation():
    assert cfg("--force_a").force_asymmetric


def test_overload_prot_optional_argument():
    assert cfg("-f", "--overload_prot=1").overload_prot
    # an option argument that merely looks like it is left alone
    c = cfg("-f", "-s", "--overload_prot=x")
    assert c.control_sockets == ("--overload_prot=x",)
    assert not c.overload_prot


def test_tos_accepts_range():
    assert cfg("-t", "0").tos == 0
    assert cfg("-t", "255").tos == 255
    assert cfg("-t", " +16").tos == 16  # strtol-style


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-h"], "rtpproxy: invalid option -- 'h'\n"),
        (["-?"], "rtpproxy: invalid option -- '?'\n"),
        (["-f", "-x"], "rtpproxy: invalid option -- 'x'\n"),
        (["-l"], "rtpproxy: option requires an argument -- 'l'\n"),
        (["--help"], "rtpproxy: unrecognized option '--help'\n"),
        (["--no_re"], "rtpproxy: option '--no_re' is ambiguous\n"),
        (["--nice"], "rtpproxy: option '--nice' requires an argument\n"),
        (["--no_resolve=1"], "rtpproxy: option '--no_resolve' doesn't allow an argument\n"),
        (["-f", "junk"], "rtpproxy: 1 extra unhandled argument at the end of the command line\n"),
        (["a", "-f", "b"], "rtpproxy: 2 extra unhandled arguments at the end of the command line\n"),
    ],
)
def test_usage_errors(capsys, args, message):
    assert fails(capsys, *args) == message + USAGE


def test_usage_text_mentions_every_short_option():
    for ch in cli.SHORT_OPTS.replace(":", ""):
        assert ch in USAGE.split("usage:")[1], ch


# ---------------------------------------------------------------- ports


@pytest.mark.parametrize(
    ("m", "M", "expected"),
    [
        ("35000", "65000", (35000, 64998)),
        ("10001", "20001", (10002, 20000)),
        ("20000", "20199", (20000, 20198)),
        ("1", "65535", (2, 65534)),
        ("100", "101", (100, 100)),
        ("100", "102", (100, 100)),
    ],
)
def test_port_normalisation(m, M, expected):
    c = cfg("-m", m, "-M", M)
    assert (c.port_min, c.port_max) == expected


def test_normalise_ports_direct():
    assert normalise_ports(35000, 65000) == (35000, 64998)
    with pytest.raises(ConfigError, match="^port_min should be less than port_max$"):
        normalise_ports(101, 102)


# ---------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "-1"], "-1: TOS is too small/large"),
        (["-t", "256"], "256: TOS is too small/large"),
        (["-t", "0xb8"], "0xb8: TOS argument is invalid"),
        (["-T", "0"], "0: max TTL argument is invalid"),
        (["-T", "x"], "x: max TTL argument is invalid"),
        (["-W", "0"], "0: max setup TTL argument is invalid"),
        (["-L", "-1"], "-1: max file rlimit argument is invalid"),
        (["-L", "lots"], "lots: max file rlimit argument is invalid"),
        (["-m", "0"], "invalid value of the port_min argument, not in the range 1-65535"),
        (["-m", "65536"], "invalid value of the port_min argument, not in the range 1-65535"),
        (["-m", "1e4"], "1e4: min port argument is invalid"),
        (["-M", "70000"], "invalid value of the port_max argument, not in the range 1-65535"),
        (["-M", ""], ": max port argument is invalid"),
        (["-m", "101", "-M", "102"], "port_min should be less than port_max"),
        (["-w", "4096"], "4096: socket mode argument is invalid"),
        (["-w", "0o660"], "0o660: socket mode argument is invalid"),
        (["-d", "LOUD"], "LOUD: invalid log level"),
        (["-d", "INFO:LOG_NOWHERE"], "LOG_NOWHERE: invalid log facility"),
        (["-c", "batch"], "batch: unknown scheduling policy"),
        (["--nice", "21"], "21: nice level is out of range -20..20"),
        (["--nice", "x"], "x: nice level argument is invalid"),
        (["-A", ""], "first advertised address is invalid"),
        (["-A", "/1.2.3.4"], "first advertised address is invalid"),
        (["-A", "1.2.3.4/"], "second advertised address is invalid"),
        (["-n", ""], "timeout notification socket name too short"),
        (
            ["-n", "tcp:9999"],
            "error adding timeout notification: Can't parse host:port: invalid address",
        ),
        (
            ["-n", "tcp:127.0.0.1:0"],
            "error adding timeout notification: Can't parse host:port: invalid port",
        ),
        (["-u", "no-such-user-here"], "can't find ID for the user: no-such-user-here"),
        (["-u", ":no-such-group-here"], "can't find ID for the group: no-such-group-here"),
        (["-s", "udp:127.0.0.1:99999"], "can't parse control socket argument: "),
        (["-S", "/tmp"], "-S switch requires -r switch"),
        (["-l", "127.0.0.1", "-6", "::1"], "address label is missing"),
        (["-l", "127.0.0.1", "-l", "@127.0.0.2"], "address label is missing"),
        (["-l", "a@127.0.0.1", "-l", "a@127.0.0.2"], "host2bindaddr(127.0.0.2): duplicate label"),
        (
            ["-l", "127.0.0.1", "-l", "x@127.0.0.2/127.0.0.3"],
            "only the first IPv4 listening address can have external part",
        ),
        (
            ["-l", "127.0.0.1/127.0.0.2", "-6", "::1/::2"],
            "either IPv4 or IPv6 should be configured for external interface in bridging "
            "mode, not both",
        ),
        (
            ["-l", "127.0.0.1/127.0.0.2", "-6", "::1"],
            "either IPv4 or IPv6 should be configured for internal interface in bridging "
            "mode, not both",
        ),
        (
            ["-l", "/127.0.0.2"],
            "incomplete configuration of the bridging mode - exactly 2 listen addresses required",
        ),
        (
            ["-l", "127.0.0.1/127.0.0.2", "-A", "192.0.2.1"],
            "two advertised addresses are required for internal and external interfaces in "
            "bridging mode",
        ),
        (["-l", "x@127.0.0.1/127.0.0.2"], "bridging address(es) cannot have a label"),
        (
            ["-l", "127.0.0.1/127.0.0.2=192.0.2.1"],
            "bridging address(es) cannot have an advertised address, use matching -A argument",
        ),
        (["--no_resolve", "-l", "localhost"], "host2bindaddr(localhost): "),
        (["-l", "999.1.1.1"], "host2bindaddr(999.1.1.1): "),
        (["-l"] + ["x"] * 0 + ["127.0.0.1"] + sum((["-l", f"l{i}@127.0.0.{i}"] for i in range(2, 18)), []),
         "number of listening addresses exceeds BINDARG_MAX"),
    ],
)  # fmt: skip
def test_validation_errors(capsys, fake_app, args, message):
    err = fails(capsys, "-fF", *args)
    assert err.startswith("rtpproxy: " + message)
    assert err.endswith("\n") and err.count("\n") == 1
    assert "usage:" not in err


@pytest.mark.parametrize("sock", ["stdio:", "stdioc:"])
def test_stdio_requires_foreground(capsys, fake_app, sock):
    assert fails(capsys, "-F", "-s", sock) == "rtpproxy: stdio command mode requires -f switch\n"
    assert fake_app == []


def test_per_option_errors_come_in_command_line_order(capsys):
    assert fails(capsys, "-fF", "-T", "0", "-t", "999").startswith("rtpproxy: 0: max TTL")


# ---------------------------------------------------------------- addresses


def test_bind_forms():
    assert cfg("-l", "*").bind_addrs == (BindAddr(4, None),)
    assert cfg("-l", "0.0.0.0").bind_addrs == (BindAddr(4, None),)
    assert cfg("-6", "::").bind_addrs == (BindAddr(6, None),)
    assert cfg("-6", "::1").bind_addrs == (BindAddr(6, "::1"),)
    assert cfg("-l", "127.0.0.1=192.0.2.7").bind_addrs == (BindAddr(4, "127.0.0.1", "192.0.2.7"),)
    assert cfg("-l", "pub@127.0.0.1").bind_addrs == (BindAddr(4, "127.0.0.1", label="pub"),)


def test_bridge_v4():
    c = cfg("-l", "127.0.0.1/127.0.0.2", "-A", "192.0.2.1/198.51.100.1")
    assert c.bridge and c.force_asymmetric
    assert c.internal == BindAddr(4, "127.0.0.1", "192.0.2.1")
    assert c.external == BindAddr(4, "127.0.0.2", "198.51.100.1")


def test_bridge_mixed_families_and_extras():
    c = cfg("-l", "127.0.0.1", "-6", "/::1", "-l", "x@127.0.0.3", "--bridge_symmetric")
    assert c.bridge and not c.force_asymmetric
    assert c.bind_addrs == (BindAddr(4, "127.0.0.1"), BindAddr(6, "::1"), BindAddr(4, "127.0.0.3", label="x"))
    c = cfg("-l", "/127.0.0.2", "-6", "::1")
    assert (c.internal, c.external) == (BindAddr(6, "::1"), BindAddr(4, "127.0.0.2"))


def test_advertised_without_bridge(capsys):
    # rtpproxy 3.2 ignores -A outside bridging mode; we apply it (older
    # versions did, and NAT deployments rely on it) unless addr=adv is given.
    assert cfg("-A", "192.0.2.1").bind_addrs == (BindAddr(4, None, "192.0.2.1"),)
    assert cfg("-l", "127.0.0.1", "-A", "192.0.2.1").internal.adv == "192.0.2.1"
    assert cfg("-l", "127.0.0.1=192.0.2.9", "-A", "192.0.2.1").internal.adv == "192.0.2.9"
    c = cfg("-l", "127.0.0.1", "-A", "192.0.2.1/192.0.2.2")
    assert c.internal.adv == "192.0.2.1"
    assert "second -A address is only used in bridging mode" in capsys.readouterr().err


def test_build_bind_addrs_resolves_names():
    seen = []

    def resolve(host, family, no_resolve):
        seen.append((host, family, no_resolve))
        return "192.0.2.55"

    addrs, bridge = build_bind_addrs(
        [BindArg.parse("in.example/out.example", 4)], ("a", "b"), no_resolve=True, resolve=resolve
    )
    assert bridge
    assert addrs == (BindAddr(4, "192.0.2.55", "a"), BindAddr(4, "192.0.2.55", "b"))
    assert seen == [("in.example", 4, True), ("out.example", 4, True)]


def test_parse_c_int():
    assert parse_c_int("42") == 42
    assert parse_c_int(" -7") == -7
    for bad in ("", "4 ", "0x10", "1_000", "1.0", "99999999999"):
        assert parse_c_int(bad) is None


# ---------------------------------------------------------------- other values


def test_pidfile():
    assert cfg("-p", "/dev/null").pidfile is None
    c = cfg("-p", "/run/rtpproxy/rtpproxy.pid")
    assert c.pidfile == "/run/rtpproxy/rtpproxy.pid" and c.pidfile_explicit


def test_sock_mode_is_decimal():
    assert cfg("-w", "0660").sock_mode == 660
    assert cfg("-w", "432").sock_mode == 0o660


def test_run_as():
    c = cfg("-u", "root")
    assert (c.run_as.user, c.run_as.group, c.run_as.uid, c.run_as.gid) == ("root", None, 0, 0)
    c = cfg("-u", "root:root")
    assert c.run_as.group == "root" and c.run_as.gid == 0
    c = cfg("-u", ":root")
    assert c.run_as.user is None and c.run_as.uid is None and c.run_as.gid == 0


def test_log_facility_forms():
    assert cfg("-d", "INFO:LOG_LOCAL5").log_facility == "LOG_LOCAL5"
    assert cfg("-d", "dbug:local0").log_facility == "LOG_LOCAL0"
    assert cfg("-d", "Warn").log_level == "WARN"


def test_sched_and_misc():
    c = cfg("-c", "rr", "-L", "4096")
    assert c.sched == "rr" and c.nofile_limit == 4096


# ---------------------------------------------------------------- root check


@pytest.mark.parametrize(
    "sock", ["udp:127.0.0.1:22222", "udp6:::1:22222", "tcp:127.0.0.1:22222", "tcp6:::1:22222"]
)
def test_root_with_remote_socket_refused(capsys, monkeypatch, sock):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    err = fails(capsys, "-f", "-s", "unix:/tmp/x.sock", "-s", sock)
    assert err.startswith("rtpproxy: running as root with a remote")
    assert "-F" in err and err.count("\n") == 1


def test_root_with_remote_socket_and_F(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    cfg("-F", "-s", "udp:127.0.0.1:22222")
    assert capsys.readouterr().err == ""


def test_root_with_local_socket_warns(monkeypatch, capsys, fake_app):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    assert main(["-f", "-s", "unix:/tmp/x.sock", "-d", "ERR"]) == 0
    assert len(fake_app) == 1
    err = capsys.readouterr().err
    assert err.startswith("rtpproxy: WARNING: running as root")


def test_root_with_u_skips_check(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    cfg("-u", "root", "-s", "udp:127.0.0.1:22222")
    assert capsys.readouterr().err == ""


def test_not_root_no_warning(capsys):
    cfg("-s", "udp:127.0.0.1:22222")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- main() happy path


def test_main_runs_app(capsys, fake_app):
    assert main(["-f", "-s", "stdio:", "-l", "127.0.0.1", "-m", "20000", "-M", "20199"]) == 0
    (c,) = fake_app
    assert c.control_sockets == ("stdio:",) and (c.port_min, c.port_max) == (20000, 20198)
    err = capsys.readouterr().err
    assert "INFO:GLOBAL:run:" in err and "fake app ran" in err


def test_main_accepts_ignored_options(capsys, fake_app):
    assert main(["-f", "-2", "-D", "--no_resolve", "--no_redirect", "--overload_prot=1",
                 "--dso", "acct_csv", "--config", "/nonexistent.conf", "-d", "WARN"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--dso acct_csv" in err and "--config /nonexistent.conf" in err
    assert len(fake_app) == 1


def test_main_sets_nofile_limit(monkeypatch, fake_app):
    calls = []
    monkeypatch.setattr(cli.resource, "setrlimit", lambda which, lim: calls.append((which, lim)))
    monkeypatch.setattr(cli.resource, "getrlimit", lambda which: (4096, 4096))
    assert main(["-f", "-L", "4096", "-d", "ERR"]) == 0
    assert calls == [(cli.resource.RLIMIT_NOFILE, (4096, 4096))]


def test_main_nofile_limit_failure(monkeypatch, capsys, fake_app):
    def deny(which, lim):
        raise ValueError("not allowed to raise maximum limit")

    monkeypatch.setattr(cli.resource, "setrlimit", deny)
    err = fails(capsys, "-f", "-L", "99999999")
    assert err.startswith("rtpproxy: setrlimit(RLIMIT_NOFILE, 99999999): ")
    assert fake_app == []


def test_main_nice(monkeypatch, capsys, fake_app):
    calls = []
    monkeypatch.setattr(cli.os, "setpriority", lambda *a: calls.append(a))
    assert main(["-f", "--nice", "-5", "-d", "ERR"]) == 0
    assert calls == [(os.PRIO_PROCESS, 0, -5)]


def test_main_nice_failure(monkeypatch, capsys, fake_app):
    def deny(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "setpriority", deny)
    assert main(["-f", "--nice", "-5"]) == 1
    err = capsys.readouterr().err
    assert "ERR:GLOBAL:" in err and "can't set scheduling priority to -5" in err
    assert fake_app == []


def test_main_sched_failure_is_logged_not_fatal(monkeypatch, capsys, fake_app):
    def deny(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "sched_setscheduler", deny)
    assert main(["-f", "-c", "fifo"]) == 0
    assert "can't set the FIFO scheduling policy" in capsys.readouterr().err
    assert len(fake_app) == 1


# ---------------------------------------------------------------- -V -v -C as a process


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyrtpproxy", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def test_version_subprocess():
    p = run_cli("-V")
    assert (p.returncode, p.stdout, p.stderr) == (0, pyrtpproxy.__version__ + "\n", "")


def test_clock_subprocess():
    p = run_cli("-C")
    assert (p.returncode, p.stdout, p.stderr) == (0, "CLOCK_MONOTONIC\n", "")


def test_capabilities_subprocess():
    caps = pytest.importorskip("pyrtpproxy.protocol.caps")
    p = run_cli("-v")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout == caps.version_listing()
    assert p.stdout.startswith("Basic version: 20040107\n")
    assert all(line.startswith("Extension ") for line in p.stdout.splitlines()[1:])


def test_bad_option_subprocess():
    p = run_cli("-h")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == "rtpproxy: invalid option -- 'h'\n" + USAGE


def test_early_exit_options_in_order(capsys):
    assert main(["-V", "-T", "0"]) == 0
    assert capsys.readouterr().out == pyrtpproxy.__version__ + "\n"
    assert main(["-T", "0", "-V"]) == 1
    assert main(["-C"]) == 0
    assert capsys.readouterr().out == "CLOCK_MONOTONIC\n"


# ---------------------------------------------------------------- logging


def test_log_format_and_levels():
    stream = io.StringIO()
    stop = logsetup.setup_logging(Config(foreground=True, log_level="INFO"), stream=stream)
    try:
        logging.getLogger("pyrtpproxy.test").debug("hidden")
        logging.getLogger("pyrtpproxy.test").info("hello %s", "world")
        logsetup.session_logger("abc@host").warning("latched")
        logging.getLogger("x").error("bad")
        logging.getLogger("x").critical("worse")
    finally:
        stop()
    stop()  # idempotent
    lines = stream.getvalue().splitlines()
    fn = "test_log_format_and_levels"
    assert [ln.split(":", 3)[:3] for ln in lines] == [
        ["INFO", "GLOBAL", fn],
        ["WARN", "abc@host", fn],
        ["ERR", "GLOBAL", fn],
        ["CRIT", "GLOBAL", fn],
    ]
    assert lines[0].split(":", 4)[3].isdigit()
    assert lines[0].endswith(": hello world")
    # removed again
    assert not any(isinstance(h, logging.handlers.QueueHandler) for h in logging.getLogger().handlers)


def test_log_exception_traceback():
    stream = io.StringIO()
    stop = logsetup.setup_logging(Config(foreground=True), stream=stream)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("pyrtpproxy").exception("failed")
    finally:
        stop()
    text = stream.getvalue()
    assert text.startswith("ERR:GLOBAL:test_log_exception_traceback:")
    assert "RuntimeError: boom" in text


def test_log_relative_time(monkeypatch):
    monkeypatch.setenv("RTPP_LOG_TFORM", "rel")
    monkeypatch.setenv("RTPP_LOG_TSTART", str(logsetup.time.monotonic() - 3723.5))
    stream = io.StringIO()
    stop = logsetup.setup_logging(Config(foreground=True), stream=stream)
    try:
        logging.getLogger("pyrtpproxy").info("tick")
    finally:
        stop()
    line = stream.getvalue()
    assert line.startswith("01:02:0") and "/INFO:GLOBAL:" in line


def test_level_names():
    assert logsetup.level_from_name("dbug") == logging.DEBUG
    assert [logsetup.level_name(v) for v in (5, 10, 20, 30, 40, 50, 60)] == [
        "DBUG", "DBUG", "INFO", "WARN", "ERR", "CRIT", "CRIT"
    ]  # fmt: skip


def test_syslog_sink(tmp_path):
    path = str(tmp_path / "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(10)
    try:
        config = Config(foreground=False, log_level="INFO", log_facility="LOG_LOCAL5")
        stop = logsetup.setup_logging(config, syslog_address=path)
        try:
            logsetup.session_logger("cid-1").info("session created")
        finally:
            stop()
        data = sink.recv(4096).decode()
    finally:
        sink.close()
    pri = 21 * 8 + 6  # LOG_LOCAL5, LOG_INFO
    assert data.startswith(f"<{pri}>rtpproxy[{os.getpid()}]: INFO:cid-1:test_syslog_sink:")
    assert data.rstrip("\x00").endswith(": session created")


def test_syslog_missing_is_not_an_error(tmp_path, capsys):
    # openlog(3) does not fail either; the handler reconnects on each message
    stop = logsetup.setup_logging(Config(), syslog_address=str(tmp_path / "nope"))
    try:
        logging.getLogger("pyrtpproxy").warning("into the void")
    finally:
        stop()
    assert not any(isinstance(h, logging.handlers.QueueHandler) for h in logging.getLogger().handlers)


def test_prompt_dir_must_exist(tmp_path, capsys):
    from pyrtpproxy.daemon import cli

    rc = cli.main(["-f", "-F", "-s", "stdio:", "--prompt-dir", str(tmp_path / "nope")])
    assert rc == 1
    assert "not a directory" in capsys.readouterr().err
