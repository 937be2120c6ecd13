"""The validated, normalised start-up configuration.

:class:`Config` is built once by :mod:`pyrtpproxy.cli` from the command line
and never changes afterwards.  The helpers below are the pure pieces of the
validation (number parsing, port-range rounding, bind-address layout, log
level/facility names); each raises :class:`ConfigError` whose text is the
one-line message printed after ``rtpproxy: ``.

Adding an option: add a field with a default to :class:`Config` and parse
it in ``cli._apply_option``.
"""

from __future__ import annotations

import re
import socket
from logging.handlers import SysLogHandler

import attrs

# rtpproxy's compiled-in defaults (src/rtpp_defines.h).
DEFAULT_CONTROL_SOCKET = "unix:/var/run/rtpproxy.sock"
DEFAULT_PIDFILE = "/var/run/rtpproxy.pid"
DEFAULT_PORT_MIN = 35000
DEFAULT_PORT_MAX = 65000
DEFAULT_TTL = 60
DEFAULT_TOS = 0xB8
DEFAULT_FACILITY = "LOG_DAEMON"
BINDARG_MAX = 16  # how many -l/-6 arguments rtpproxy accepts
NOTIFY_TARGETS_MAX = 64
NOTIFY_WILDCARDS_MAX = 2
CC_SELF = "%%CC_SELF%%"
ENDPOINT_LEARNING_MODES = ("immediate", "delayed", "heuristic", "off")  # sessions/latch.py

# -d levels, most verbose first.
LOG_LEVELS: tuple[str, ...] = ("DBUG", "INFO", "WARN", "ERR", "CRIT")

# -d facilities; "LOG_LOCAL5" and "local5" both work (case-insensitive).
LOG_FACILITIES: dict[str, int] = {
    "LOG_AUTH": SysLogHandler.LOG_AUTH,
    "LOG_CRON": SysLogHandler.LOG_CRON,
    "LOG_DAEMON": SysLogHandler.LOG_DAEMON,
    "LOG_KERN": SysLogHandler.LOG_KERN,
    "LOG_LOCAL0": SysLogHandler.LOG_LOCAL0,
    "LOG_LOCAL1": SysLogHandler.LOG_LOCAL1,
    "LOG_LOCAL2": SysLogHandler.LOG_LOCAL2,
    "LOG_LOCAL3": SysLogHandler.LOG_LOCAL3,
    "LOG_LOCAL4": SysLogHandler.LOG_LOCAL4,
    "LOG_LOCAL5": SysLogHandler.LOG_LOCAL5,
    "LOG_LOCAL6": SysLogHandler.LOG_LOCAL6,
    "LOG_LOCAL7": SysLogHandler.LOG_LOCAL7,
    "LOG_LPR": SysLogHandler.LOG_LPR,
    "LOG_MAIL": SysLogHandler.LOG_MAIL,
    "LOG_NEWS": SysLogHandler.LOG_NEWS,
    "LOG_USER": SysLogHandler.LOG_USER,
    "LOG_UUCP": SysLogHandler.LOG_UUCP,
    "LOG_AUTHPRIV": SysLogHandler.LOG_AUTHPRIV,
    "LOG_FTP": SysLogHandler.LOG_FTP,
    "LOG_SYSLOG": SysLogHandler.LOG_SYSLOG,
}


class ConfigError(Exception):
    """A command-line value is unusable; str(exc) is the message to print."""


@attrs.frozen
class BindAddr:
    """One media bind address.

    family: 4 or 6.  addr: a numeric address, or None for the wildcard
    (``*``, ``0.0.0.0`` for -l, ``::`` for -6): replies then carry only the
    port.  adv: the address to write in U/L replies instead of addr (from
    ``addr=adv`` or -A).  label: the ``label@`` name, if any.
    """

    family: int
    addr: str | None
    adv: str | None = None
    label: str | None = None


@attrs.frozen
class RunAs:
    """-u user[:group], looked up at parse time.

    uid is None when only ``:group`` was given; gid is the group's id, or the
    user's primary group when no group was given.
    """

    user: str | None
    group: str | None
    uid: int | None
    gid: int | None


@attrs.frozen(kw_only=True)
class Config:
    # control
    control_sockets: tuple[str, ...] = (DEFAULT_CONTROL_SOCKET,)
    # media addresses: [0] internal (or the only one), [1] external when
    # bridge is True, then the labelled extras in command-line order.
    bind_addrs: tuple[BindAddr, ...] = (BindAddr(4, None),)
    bridge: bool = False
    port_min: int = 35000  # -m 35000 normalised
    port_max: int = 64998  # -M 65000 normalised (even: minus 2)
    sequential_ports: bool = False  # -b
    # sessions
    ttl: int = DEFAULT_TTL  # -T
    setup_ttl: int = DEFAULT_TTL  # -W (defaults to -T)
    independent_ttl: bool = False  # -i
    tos: int = DEFAULT_TOS  # -t
    dup_small: bool = False  # -2
    force_asymmetric: bool = False  # --force_asymmetric, or bridge without --bridge_symmetric
    bridge_symmetric: bool = False  # --bridge_symmetric
    no_resolve: bool = False  # --no_resolve
    overload_prot: bool = False  # --overload_prot
    # recording
    record_dir: str | None = None  # -r
    spool_dir: str | None = None  # -S
    pcap: bool = False  # -P
    record_all: bool = False  # -a
    no_rtcp_record: bool = False  # -R
    # notifications
    notify_targets: tuple[str, ...] = ()  # -n, bare paths get "unix:"
    # process
    pidfile: str | None = DEFAULT_PIDFILE  # -p; None for /dev/null
    pidfile_explicit: bool = False  # -p was given
    foreground: bool = False  # -f
    no_root_check: bool = False  # -F
    run_as: RunAs | None = None  # -u
    sock_mode: int | None = None  # -w (decimal, 0..4095); None if not given
    nofile_limit: int | None = None  # -L
    no_chdir: bool = False  # -D
    no_redirect: bool = False  # --no_redirect
    sched: str | None = None  # -c fifo|rr
    nice: int | None = None  # --nice
    # logging
    log_level: str = "DBUG"  # one of LOG_LEVELS; default DBUG with -f, WARN without
    log_facility: str = DEFAULT_FACILITY  # key of LOG_FACILITIES
    # modules
    config_file: str | None = None  # --config
    dso: tuple[str, ...] = ()  # --dso
    # our own
    prompt_dir: str | None = None  # --prompt-dir
    metrics: str | None = None  # --metrics
    workers: int = 0  # --workers: media worker processes (0: relay in-process)
    kernel: str | None = None  # --kernel: "on" or "auto" (kernel fast path)
    endpoint_learning: str = "immediate"  # --endpoint-learning
    strict_source: bool = False  # --strict-source
    control_allow: tuple[str, ...] = ()  # --control-allow, normalised CIDRs
    mediaproxy_sockets: tuple[str, ...] = ()  # --mediaproxy: dispatcher socket paths
    mediaproxy_mi: str | None = "unix:/run/opensips/socket"  # --mediaproxy-mi (None: off)
    analyze: bool = False  # --analyze: RTP analysis (rtpa_* counters) for every session
    state: str | None = None  # --state sqlite:PATH | redis://HOST:PORT/DB
    state_node: str | None = None  # --state-node (default: the host name)

    @property
    def internal(self) -> BindAddr:
        return self.bind_addrs[0]

    @property
    def external(self) -> BindAddr | None:
        return self.bind_addrs[1] if self.bridge else None

    @property
    def labelled(self) -> tuple[BindAddr, ...]:
        """The extra (label@addr) addresses after the primary one(s)."""
        return self.bind_addrs[2 if self.bridge else 1 :]


# ---------------------------------------------------------------- numbers

_C_INT = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+\Z")


def parse_c_int(s: str) -> int | None:
    """A whole-string base-10 integer as rtpproxy's atoi_safe reads it.

    Leading white space and a sign are allowed; anything else (empty,
    trailing junk, hex, underscores) gives None.  Values outside a C int are
    treated as invalid too.
    """
    if not _C_INT.match(s):
        return None
    value = int(s.strip())
    if not -(2**31) <= value < 2**31:
        return None
    return value


def normalise_ports(port_min: int, port_max: int) -> tuple[int, int]:
    """rtpproxy's rounding: min up to even; max to the even port below an
    odd max, or two below an even max (its RTCP port must fit)."""
    if port_min % 2:
        port_min += 1
    if port_max % 2:
        port_max -= 1
    else:
        port_max -= 2
    if port_min > port_max:
        raise ConfigError("port_min should be less than port_max")
    return port_min, port_max


# ---------------------------------------------------------------- logging


def parse_log_spec(spec: str) -> tuple[str, str | None]:
    """-d LEVEL[:FACILITY] -> (canonical level, canonical facility or None)."""
    level, sep, fac = spec.partition(":")
    facility = None
    if sep:
        facility = canonical_facility(fac)
        if facility is None:
            raise ConfigError(f"{fac}: invalid log facility")
    upper = level.upper()
    if upper not in LOG_LEVELS:
        raise ConfigError(f"{level}: invalid log level")
    return upper, facility


def canonical_facility(name: str) -> str | None:
    upper = name.upper()
    if upper in LOG_FACILITIES:
        return upper
    if "LOG_" + upper in LOG_FACILITIES:
        return "LOG_" + upper
    return None


# ---------------------------------------------------------------- bind addresses


@attrs.frozen
class BindArg:
    """One -l/-6 argument split as rtpproxy splits it: label@host=adv."""

    family: int
    host: str
    label: str | None = None
    adv: str | None = None

    @classmethod
    def parse(cls, arg: str, family: int) -> BindArg:
        label = None
        adv = None
        if "@" in arg:
            label, _, arg = arg.partition("@")
        if "=" in arg:
            arg, _, adv = arg.partition("=")
        return cls(family, arg, label, adv)


def _is_wildcard(host: str, family: int) -> bool:
    return host == "*" or host == ("0.0.0.0" if family == 4 else "::")


def resolve_bind_host(host: str, family: int, no_resolve: bool) -> str | None:
    """The numeric address to bind for host, None for the wildcard."""
    if _is_wildcard(host, family):
        return None
    if not host:
        raise ConfigError(f"host2bindaddr({host}): empty address")
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if no_resolve else 0)
    try:
        infos = socket.getaddrinfo(host, None, af, socket.SOCK_DGRAM, 0, flags)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"host2bindaddr({host}): {reason}") from None
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise ConfigError(f"host2bindaddr({host}): no address")
    return str(infos[0][4][0])


def build_bind_addrs(
    args: list[BindArg],
    adv: tuple[str | None, str | None],
    *,
    no_resolve: bool = False,
    resolve=resolve_bind_host,
) -> tuple[tuple[BindAddr, ...], bool]:
    """Lay out the -l/-6 arguments as rtpproxy does.

    Returns (bind_addrs, bridge).  The first -l and the first -6 may hold an
    ``in/out`` pair (or ``/out``: the other family then gives the internal
    side); that makes bridging mode, where [0] is internal and [1] external.
    Every further address needs a label.  adv holds the two halves of -A;
    in bridging mode they are the internal and external advertised
    addresses, otherwise the first one applies to [0] (unless that address
    has its own ``=adv``).
    """
    for a in args:
        if a.label == "":
            raise ConfigError("address label is missing")
        if a.adv == "":
            raise ConfigError(f"{a.host}=: advertised address is invalid")

    if not args:
        return (BindAddr(4, None, adv[0]),), False

    pending: list[BindArg | None] = list(args)
    first = {fam: next((i for i, a in enumerate(args) if a.family == fam), None) for fam in (4, 6)}
    internal: BindArg | None = None
    external: BindArg | None = None
    bridge = False
    for fam in (4, 6):
        i = first[fam]
        if i is None or "/" not in args[i].host:
            continue
        if external is not None:
            raise ConfigError(
                "either IPv4 or IPv6 should be configured for external interface in bridging mode, not both"
            )
        bridge = True
        inside, _, outside = args[i].host.partition("/")
        external = attrs.evolve(args[i], host=outside)
        pending[i] = attrs.evolve(args[i], host=inside) if inside else None
    result: list[BindAddr] = []
    if bridge:
        for fam in (4, 6):
            i = first[fam]
            if i is None or pending[i] is None:
                continue
            if internal is not None:
                raise ConfigError(
                    "either IPv4 or IPv6 should be configured for internal "
                    "interface in bridging mode, not both"
                )
            internal = pending[i]
            pending[i] = None
        if internal is None or external is None:
            raise ConfigError(
                "incomplete configuration of the bridging mode - exactly 2 listen addresses required"
            )
        if adv[0] is not None and adv[1] is None:
            raise ConfigError(
                "two advertised addresses are required for internal and external interfaces in bridging mode"
            )
        for side, a in enumerate((internal, external)):
            if a.label is not None:
                raise ConfigError("bridging address(es) cannot have a label")
            if a.adv is not None:
                raise ConfigError(
                    "bridging address(es) cannot have an advertised address, use matching -A argument"
                )
            result.append(BindAddr(a.family, resolve(a.host, a.family, no_resolve), adv[side]))

    labels: set[str] = set()
    for a in pending:
        if a is None:
            continue
        if result and a.label is None:
            raise ConfigError("address label is missing")
        if "/" in a.host:
            fam = "IPv6" if a.family == 6 else "IPv4"
            raise ConfigError(f"only the first {fam} listening address can have external part")
        if a.label is not None:
            if a.label in labels:
                raise ConfigError(f"host2bindaddr({a.host}): duplicate label")
            labels.add(a.label)
        a_adv = a.adv
        if not result and a_adv is None:
            a_adv = adv[0]
        result.append(BindAddr(a.family, resolve(a.host, a.family, no_resolve), a_adv, a.label))
    return tuple(result), bridge


# ---------------------------------------------------------------- notify targets


def normalise_notify_target(target: str) -> str:
    """Check one -n argument; bare paths become ``unix:<path>``."""
    if target == "":
        raise ConfigError("timeout notification socket name too short")
    if target.startswith("tcp:"):
        host, sep, port = target[4:].rpartition(":")
        if not sep or not host or not port:
            raise ConfigError("error adding timeout notification: Can't parse host:port: invalid address")
        p = parse_c_int(port)
        if p is None or not 0 < p <= 65535:
            raise ConfigError("error adding timeout notification: Can't parse host:port: invalid port")
        return target
    path = target[5:] if target.startswith("unix:") else target
    if not path:
        raise ConfigError("error adding timeout notification: Timeout notification socket name too short")
    return "unix:" + path


def check_notify_limits(targets: tuple[str, ...]) -> None:
    wild = sum(1 for t in targets if t.startswith(f"tcp:{CC_SELF}:"))
    if wild > NOTIFY_WILDCARDS_MAX or len(targets) - wild > NOTIFY_TARGETS_MAX:
        raise ConfigError("error adding timeout notification: too many notification targets")


def parse_cidr_list(arg: str) -> tuple[str, ...]:
    """--control-allow: ``CIDR[,CIDR...]`` (a bare address is a /32 or /128).

    Returns the networks in canonical form; raises ConfigError on a bad one.
    """
    import ipaddress

    out: list[str] = []
    for item in arg.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"--control-allow {arg}: empty network")
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"--control-allow {item}: not an address or CIDR network") from None
        out.append(str(net))
    return tuple(out)
