"""rtpproxy's command line: the same options, defaults, checks and messages.

Parsing uses :func:`getopt.gnu_getopt` with rtpproxy's own short-option
string, so combined flags (``-fF``), attached arguments (``-m10000``),
repeated options, arguments starting with ``-`` (``-t -1``), options after
operands and unambiguous abbreviations of the long options all behave as
with C ``getopt_long``.  Options are applied in command-line order, so
``-V``, ``-v`` and ``-C`` print and exit as soon as they are reached, and a
bad value before them is reported instead.

Errors are one line on stderr prefixed ``rtpproxy: `` and exit status 1;
option syntax errors also print the usage text.
"""

from __future__ import annotations

import getopt
import grp
import logging
import os
import pwd
import resource
import sys
from collections.abc import Sequence

import attrs

from .. import __version__
from .config import (
    BINDARG_MAX,
    DEFAULT_CONTROL_SOCKET,
    ENDPOINT_LEARNING_MODES,
    BindArg,
    Config,
    ConfigError,
    RunAs,
    build_bind_addrs,
    check_notify_limits,
    normalise_notify_target,
    normalise_ports,
    parse_c_int,
    parse_cidr_list,
    parse_log_spec,
)

PROG = "rtpproxy"
SHORT_OPTS = "vf2Rl:6:s:S:t:r:p:T:L:m:M:u:Fin:Pad:Vc:A:w:bW:DC"
# rtpproxy's long options, then ours.  --overload_prot takes an optional
# argument (``--overload_prot=x``), which Python's getopt cannot express: it
# is declared without one and the ``=x`` is dropped before parsing.
LONG_OPTS = [
    "dso=",
    "bridge_symmetric",
    "nice=",
    "overload_prot",
    "config=",
    "force_asymmetric",
    "no_resolve",
    "no_redirect",
    "prompt-dir=",
    "metrics=",
    "workers=",
    "kernel",
    "endpoint-learning=",
    "strict-source",
    "mediaproxy=",
    "mediaproxy-mi=",
    "analyze",
    "state=",
    "state-node=",
    "control-allow=",
]
_OPTIONAL_ARG_LONG = frozenset({"overload_prot", "kernel"})
MONOTONIC_CLOCK_NAME = "CLOCK_MONOTONIC"  # what time.monotonic() reads on Linux
PRIO_MIN, PRIO_MAX = -20, 20

USAGE = f"""\
usage: {PROG} [-2abDfFiPRv] [-l addr|in/out|label@addr[=adv]]...
         [-6 addr|in/out|label@addr[=adv]]... [-s ctrl_socket]...
         [-A adv|adv_in/adv_out] [-m port_min] [-M port_max] [-T ttl]
         [-W setup_ttl] [-t tos] [-r rec_dir [-S spool_dir]]
         [-n notify_socket]... [-p pid_file] [-u user[:group]] [-w sock_mode]
         [-L nofile] [-d level[:facility]] [-c fifo|rr]
         [--force_asymmetric] [--bridge_symmetric] [--no_resolve]
         [--no_redirect] [--nice n] [--overload_prot] [--config file]
         [--dso module] [--prompt-dir dir] [--metrics url] [--workers n]
         [--kernel[=auto]]
         [--endpoint-learning immediate|delayed|heuristic|off]
         [--strict-source]
         [--mediaproxy unix:path]... [--mediaproxy-mi unix:path|udp:host:port|none]
         [--analyze]
         [--state sqlite:path|redis://host:port/db] [--state-node id]
         [--control-allow cidr[,cidr...]]
       {PROG} -V | -v | -C
"""

REMOTE_CONTROL_KINDS = frozenset({"udp", "udp6", "tcp", "tcp6"})
STDIO_CONTROL_KINDS = frozenset({"stdio", "stdioc"})

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad command-line syntax: print the message, then the usage text."""


class EarlyExit(Exception):
    """-v, -V, -C: the output has been printed; exit with this status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- getopt glue


def _long_name(token: str) -> str | None:
    """The long option a ``--name[=x]`` token resolves to (or None)."""
    name = token[2:].partition("=")[0]
    names = [o.rstrip("=") for o in LONG_OPTS]
    if name in names:
        return name
    matches = [n for n in names if n.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _kernel_arg(args: Sequence[str]) -> str | None:
    """The ``=value`` of the last ``--kernel=value`` (getopt cannot see it)."""
    val = None
    for tok in args:
        if tok == "--":
            break
        if tok.startswith("--") and "=" in tok and _long_name(tok) == "kernel":
            val = tok.partition("=")[2]
    return val


def _drop_optional_long_args(args: Sequence[str]) -> list[str]:
    """Remove the ``=value`` of options with an optional argument.

    Walks the arguments the way gnu_getopt will, so a token that is the
    argument of a previous option is left alone.
    """
    takes_arg = {o.rstrip("=") for o in LONG_OPTS if o.endswith("=")}
    short_with_arg = {c for c, nxt in zip(SHORT_OPTS, SHORT_OPTS[1:] + " ") if nxt == ":"}
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            out.append(tok)
            out.extend(args[i:])
            break
        if tok.startswith("--"):
            name = _long_name(tok)
            if name in _OPTIONAL_ARG_LONG and "=" in tok:
                tok = tok.partition("=")[0]
            out.append(tok)
            if name in takes_arg and "=" not in tok and i < len(args):
                out.append(args[i])
                i += 1
            continue
        out.append(tok)
        if tok.startswith("-") and tok != "-":
            for j, ch in enumerate(tok[1:], start=1):
                if ch in short_with_arg:
                    if j == len(tok) - 1 and i < len(args):
                        out.append(args[i])
                        i += 1
                    break
    return out


def _getopt_message(exc: getopt.GetoptError) -> str:
    """glibc getopt_long's wording for Python's getopt errors."""
    msg, opt = exc.msg, exc.opt
    if msg.startswith("option --"):
        if "not a unique prefix" in msg:
            return f"option '--{opt}' is ambiguous"
        if "must not have an argument" in msg:
            return f"option '--{opt}' doesn't allow an argument"
        if "requires argument" in msg:
            return f"option '--{opt}' requires an argument"
        return f"unrecognized option '--{opt}'"
    if "requires argument" in msg:
        return f"option requires an argument -- '{opt}'"
    return f"invalid option -- '{opt}'"


def usage() -> None:
    sys.stderr.write(USAGE)
    sys.stderr.flush()


# ---------------------------------------------------------------- control sockets


def control_kind(spec: str) -> str:
    """The transport of a -s argument; raises ConfigError when unparsable."""
    from .control import parse_control_url

    try:
        return parse_control_url(spec).kind
    except ValueError as exc:
        raise ConfigError(f"can't parse control socket argument: {exc}") from None


# ---------------------------------------------------------------- building Config


def _int_arg(
    arg: str,
    lo: int,
    hi: int | None,
    invalid: str,
    out_of_range: str | None = None,
) -> int:
    value = parse_c_int(arg)
    if value is None:
        raise ConfigError(invalid.format(arg=arg))
    if value < lo or (hi is not None and value > hi):
        raise ConfigError((out_of_range or invalid).format(arg=arg))
    return value


def _run_as(arg: str) -> RunAs:
    user: str | None = arg
    group: str | None = None
    if ":" in arg:
        user, _, group = arg.partition(":")
        if user == "":
            user = None
    uid = gid = None
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"can't find ID for the user: {user}") from None
        uid = pw.pw_uid
        if group is None:
            gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"can't find ID for the group: {group}") from None
    return RunAs(user, group, uid, gid)


def _print_version_listing() -> None:
    try:
        from ..protocol.caps import version_listing
    except ImportError:  # pragma: no cover - caps.py arrives with the parser
        raise ConfigError("-v: the capability table is not available") from None
    text = version_listing()
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def build_config(argv: Sequence[str]) -> Config:
    """Parse and check the arguments (without the program name).

    Raises UsageError, ConfigError or EarlyExit.  May print the root-user
    warning on stderr, as rtpproxy does while parsing.
    """
    kernel_arg = _kernel_arg(argv)
    try:
        opts, rest = getopt.gnu_getopt(_drop_optional_long_args(argv), SHORT_OPTS, LONG_OPTS)
    except getopt.GetoptError as exc:
        raise UsageError(_getopt_message(exc)) from None

    kw: dict[str, object] = {}
    bind_args: list[BindArg] = []
    adv: tuple[str | None, str | None] = (None, None)
    controls: list[str] = []
    kinds: list[str] = []
    notify: list[str] = []
    dso: list[str] = []
    mediaproxy: list[str] = []
    port_min, port_max = 35000, 65000
    log_level: str | None = None

    for opt, arg in opts:
        match opt:
            case "-v":
                _print_version_listing()
                raise EarlyExit(0)
            case "-V":
                print(__version__, flush=True)
                raise EarlyExit(0)
            case "-C":
                print(MONOTONIC_CLOCK_NAME, flush=True)
                raise EarlyExit(0)
            case "-f":
                kw["foreground"] = True
            case "-F":
                kw["no_root_check"] = True
            case "-2":
                kw["dup_small"] = True
            case "-i":
                kw["independent_ttl"] = True
            case "-P":
                kw["pcap"] = True
            case "-a":
                kw["record_all"] = True
            case "-R":
                kw["no_rtcp_record"] = True
            case "-b":
                kw["sequential_ports"] = True
            case "-D":
                kw["no_chdir"] = True
            case "-l" | "-6":
                if len(bind_args) == BINDARG_MAX:
                    raise ConfigError("number of listening addresses exceeds BINDARG_MAX")
                bind_args.append(BindArg.parse(arg, 6 if opt == "-6" else 4))
            case "-A":
                first, slash, second = arg.partition("/")
                if first == "":
                    raise ConfigError("first advertised address is invalid")
                if slash and second == "":
                    raise ConfigError("second advertised address is invalid")
                adv = (first, second if slash else None)
            case "-s":
                kinds.append(control_kind(arg))
                controls.append(arg)
            case "-t":
                kw["tos"] = _int_arg(
                    arg, 0, 255, "{arg}: TOS argument is invalid", "{arg}: TOS is too small/large"
                )
            case "-r":
                kw["record_dir"] = arg
            case "-S":
                kw["spool_dir"] = arg
            case "-p":
                kw["pidfile"] = None if arg == "/dev/null" else arg
                kw["pidfile_explicit"] = True
            case "-T":
                kw["ttl"] = _int_arg(arg, 1, None, "{arg}: max TTL argument is invalid")
            case "-W":
                kw["setup_ttl"] = _int_arg(arg, 1, None, "{arg}: max setup TTL argument is invalid")
            case "-L":
                kw["nofile_limit"] = _int_arg(arg, 0, None, "{arg}: max file rlimit argument is invalid")
            case "-m":
                port_min = _int_arg(
                    arg,
                    1,
                    65535,
                    "{arg}: min port argument is invalid",
                    "invalid value of the port_min argument, not in the range 1-65535",
                )
            case "-M":
                port_max = _int_arg(
                    arg,
                    1,
                    65535,
                    "{arg}: max port argument is invalid",
                    "invalid value of the port_max argument, not in the range 1-65535",
                )
            case "-u":
                kw["run_as"] = _run_as(arg)
            case "-w":
                kw["sock_mode"] = _int_arg(arg, 0, 4095, "{arg}: socket mode argument is invalid")
            case "-n":
                notify.append(normalise_notify_target(arg))
            case "-d":
                log_level, facility = parse_log_spec(arg)
                if facility is not None:
                    kw["log_facility"] = facility
            case "-c":
                if arg not in ("fifo", "rr"):
                    raise ConfigError(f"{arg}: unknown scheduling policy")
                kw["sched"] = arg
            case "--dso":
                dso.append(arg)
            case "--bridge_symmetric":
                kw["bridge_symmetric"] = True
            case "--nice":
                kw["nice"] = _int_arg(
                    arg,
                    PRIO_MIN,
                    PRIO_MAX,
                    "{arg}: nice level argument is invalid",
                    f"{{arg}}: nice level is out of range {PRIO_MIN}..{PRIO_MAX}",
                )
            case "--overload_prot":
                kw["overload_prot"] = True
            case "--config":
                kw["config_file"] = arg
            case "--force_asymmetric":
                kw["force_asymmetric"] = True
            case "--no_resolve":
                kw["no_resolve"] = True
            case "--no_redirect":
                kw["no_redirect"] = True
            case "--prompt-dir":
                if not os.path.isdir(arg):
                    raise ConfigError(f"--prompt-dir {arg}: not a directory")
                kw["prompt_dir"] = arg
            case "--metrics":
                kw["metrics"] = arg
            case "--workers":
                try:
                    n = int(arg)
                except ValueError:
                    raise ConfigError(f"--workers {arg}: argument is invalid") from None
                if n < 0 or n > 256:
                    raise ConfigError(f"--workers {arg}: argument is invalid")
                kw["workers"] = n if n > 0 else (os.cpu_count() or 1)
            case "--kernel":
                if kernel_arg not in (None, "auto"):
                    raise ConfigError(f"--kernel={kernel_arg}: argument is invalid (only --kernel=auto)")
                kw["kernel"] = kernel_arg or "on"
            case "--endpoint-learning":
                if arg not in ENDPOINT_LEARNING_MODES:
                    raise ConfigError(
                        f"--endpoint-learning {arg}: unknown mode, expected one of "
                        + "|".join(ENDPOINT_LEARNING_MODES)
                    )
                kw["endpoint_learning"] = arg
            case "--strict-source":
                kw["strict_source"] = True
            case "--mediaproxy":
                from .mediaproxy import parse_socket_arg

                try:
                    mediaproxy.append(os.path.abspath(parse_socket_arg(arg)))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            case "--mediaproxy-mi":
                from .mediaproxy import parse_mi_arg

                try:
                    kw["mediaproxy_mi"] = None if parse_mi_arg(arg) is None else arg
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            case "--analyze":
                kw["analyze"] = True
            case "--state":
                if not (arg.startswith(("sqlite:", "redis://", "rediss://"))):
                    raise ConfigError(f"--state {arg}: expected sqlite:PATH or redis://HOST:PORT/DB")
                kw["state"] = arg
            case "--state-node":
                if not arg or any(c.isspace() for c in arg):
                    raise ConfigError(f"--state-node {arg!r}: argument is invalid")
                kw["state_node"] = arg
            case "--control-allow":
                kw["control_allow"] = tuple(kw.get("control_allow", ())) + parse_cidr_list(arg)
            case _:  # pragma: no cover - getopt only returns declared options
                raise UsageError(f"invalid option -- '{opt.lstrip('-')}'")

    if rest:
        n = len(rest)
        raise UsageError(f"{n} extra unhandled argument{'s' if n > 1 else ''} at the end of the command line")

    ttl = kw.get("ttl", attrs.fields(Config).ttl.default)
    kw.setdefault("setup_ttl", ttl)
    if not controls and not mediaproxy:
        # with --mediaproxy alone, no rtpproxy control socket is opened
        controls.append(DEFAULT_CONTROL_SOCKET)
        kinds.append(control_kind(DEFAULT_CONTROL_SOCKET))
    kw["control_sockets"] = tuple(controls)
    kw["mediaproxy_sockets"] = tuple(mediaproxy)

    if kw.get("spool_dir") is not None and kw.get("record_dir") is None:
        raise ConfigError("-S switch requires -r switch")
    foreground = bool(kw.get("foreground", False))
    if not foreground and STDIO_CONTROL_KINDS.intersection(kinds):
        raise ConfigError("stdio command mode requires -f switch")

    if not kw.get("no_root_check") and kw.get("run_as") is None and os.geteuid() == 0:
        if REMOTE_CONTROL_KINDS.intersection(kinds):
            raise ConfigError(
                "running as root with a remote (UDP/TCP) control socket is strongly "
                "not recommended: anyone who can reach it controls a root process. "
                "Use -u to run as an unprivileged user, or -F to override this check."
            )
        _err(
            "WARNING: running as root is not recommended. "
            "Use -u to run as an unprivileged user, or -F to silence this warning."
        )

    kw["port_min"], kw["port_max"] = normalise_ports(port_min, port_max)

    no_resolve = bool(kw.get("no_resolve", False))
    kw["bind_addrs"], bridge = build_bind_addrs(bind_args, adv, no_resolve=no_resolve)
    kw["bridge"] = bridge
    if bridge and not kw.get("bridge_symmetric"):
        kw["force_asymmetric"] = True  # rtpproxy's historical bridging default
    elif not bridge and adv[1] is not None:
        _err("WARNING: the second -A address is only used in bridging mode, ignoring it")

    notify_targets = tuple(notify)
    check_notify_limits(notify_targets)
    kw["notify_targets"] = notify_targets
    kw["dso"] = tuple(dso)
    kw["log_level"] = log_level or ("DBUG" if foreground else "WARN")
    return Config(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- process settings


def apply_nofile_limit(config: Config) -> None:
    """-L: set RLIMIT_NOFILE soft and hard; warn if we got less."""
    want = config.nofile_limit
    if want is None:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"setrlimit(RLIMIT_NOFILE, {want}): {exc}") from None
    if hard != resource.RLIM_INFINITY and hard < want:
        _err(f"WARNING: file limit set to {hard}, less than the {want} requested")


def apply_scheduling(config: Config) -> None:
    """-c and --nice, after logging is up (as rtpproxy does)."""
    if config.sched is not None:
        policy = os.SCHED_FIFO if config.sched == "fifo" else os.SCHED_RR
        try:
            prio = os.sched_get_priority_max(policy)
            os.sched_setscheduler(0, policy, os.sched_param(prio))
        except OSError as exc:
            log.error("can't set the %s scheduling policy: %s", config.sched.upper(), exc.strerror)
    if config.nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, config.nice)
        except OSError as exc:
            raise ConfigError(f"can't set scheduling priority to {config.nice}: {exc.strerror}") from None


def _warn_ignored(config: Config) -> None:
    for module in config.dso:
        _err(f"WARNING: --dso {module}: modules are not supported by pyrtpproxy, ignoring it")
    if config.config_file is not None:
        _err(f"WARNING: --config {config.config_file}: modules are not supported by pyrtpproxy, ignoring it")


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = build_config(args)
        apply_nofile_limit(config)
    except EarlyExit as exc:
        return exc.code
    except UsageError as exc:
        _err(str(exc))
        usage()
        return 1
    except ConfigError as exc:
        _err(str(exc))
        return 1
    _warn_ignored(config)

    from .logsetup import setup_logging

    try:
        stop_logging = setup_logging(config)
    except OSError as exc:
        _err(f"can't initialise logging: {exc}")
        return 1
    try:
        try:
            apply_scheduling(config)
        except ConfigError as exc:
            log.error("%s", exc)
            return 1
        from .app import run

        return run(config)
    finally:
        stop_logging()


__all__ = [
    "USAGE",
    "EarlyExit",
    "UsageError",
    "build_config",
    "main",
    "usage",
]
