"""Control command parser: golden vectors and never-crash properties.

The first table replays every exchange protocol.md records as observed
(sections 1.2, 1.3, 3.x, 4), reduced to what the parser decides: either the
E-code, or the command it builds (session-dependent replies such as E50,
E60, E72 or a port number are the engine's business; there we only check
that the command parses into the right shape).  The second table is our
own, and covers every E-code the parser can produce and the order in which
rtpproxy checks things.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrtpproxy.protocol import commands as C
from pyrtpproxy.protocol.commands import ParseEnv
from pyrtpproxy.protocol.ecodes import ECode, RtppError
from pyrtpproxy.protocol.parser import MAX_ARGS, MAX_SUBCOMMANDS, parse_command
from pyrtpproxy.sessions.stats import GLOBAL_COUNTERS, QUERY_COUNTERS, QUERY_MAX_NAMES

ECODE_VALUES = frozenset(int(c) for c in ECode)

# The reference instance of protocol.md: -l 127.0.0.1 ... -n unix:... -n tcp:...
REF = ParseEnv(notify=True)
PLAIN = ParseEnv()  # no -l, no -n
NOTIFY = ParseEnv(notify=True)
V6 = ParseEnv(has_ipv6=True, labels=frozenset({"v6lab"}))  # -l * -6 v6lab@::1
V6ONLY = ParseEnv(has_ipv4=False, has_ipv6=True)  # -6 ::1 only
LBL = ParseEnv(labels=frozenset({"lo2"}))  # -l 127.0.0.1 -l lo2@127.0.0.3=...
BRIDGE = ParseEnv(bridge=True)  # -l 127.0.0.1/127.0.0.2
BRIDGE_NOTIFY = ParseEnv(bridge=True, notify=True)
SERVICES = ParseEnv(service={"sip": 5060}.get)  # a services database


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if part.isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def check(data: bytes, env: ParseEnv, expected: Any) -> None:
    """``expected`` is an E-code (int), or (class, {attr.path: value})."""
    if isinstance(expected, int):
        try:
            got = parse_command(data, env)
        except RtppError as exc:
            assert exc.code == expected, (data, exc.code, expected)
            return
        # Q's E19/E62 come after the session lookup: carried by the command.
        assert isinstance(got, C.Query) and got.deferred_error == expected, (data, got)
        return
    cls, fields = expected
    got = parse_command(data, env)
    assert type(got) is cls, (data, got)
    for path, value in fields.items():
        assert _get(got, path) == value, (data, path, _get(got, path), value)


def ok(cls: type, **fields: Any) -> tuple[type, dict[str, Any]]:
    return cls, {k.replace("__", "."): v for k, v in fields.items()}


U, L = C.Update, C.Update

# ---------------------------------------------------------------------------
# observed exchanges (protocol.md), as (id, env, request, expected)

OBSERVED: list[tuple[str, ParseEnv, bytes, Any]] = [
    # 1.2 datagram framing (cookie already stripped by the transport)
    ("1.2 V", REF, b"V", ok(C.Version)),
    ("1.2 tab", REF, b"\tV", ok(C.Version)),
    ("1.2 crlf", REF, b"V\r\n", ok(C.Version)),
    ("1.2 spaces", REF, b"   VF    20040107  ", ok(C.VersionFeature, datecode="20040107")),
    ("1.2 two commands", REF, b"V\nV", ECode.PARSE_NARGS),
    ("1.2 cookie only", REF, b"", ECode.PARSE_1),
    ("1.2 cookie only nl", REF, b"\n", ECode.PARSE_1),
    ("1.2 rtx U", REF, b"U rtx 127.0.0.1 30000 f", ok(U, call_id="rtx")),
    # 1.3 stream modes
    ("1.3 V nl", REF, b"V\n", ok(C.Version)),
    ("1.3 split VF", REF, b"VF 2005", ok(C.VersionFeature, datecode="2005")),
    ("1.3 V V", REF, b"V\nV\n", ECode.PARSE_NARGS),
    ("1.3 no nl", REF, b"V", ok(C.Version)),
    ("1.3 no cookie", REF, b"abc V", ECode.CMDUNKN),
    ("1.3 cunix VF", REF, b"VF 20050322", ok(C.VersionFeature, datecode="20050322")),
    ("1.3 cunix I", REF, b"I", ok(C.Info, brief=False, load=False)),
    ("1.3 cunix X", REF, b"X", ok(C.DeleteAll)),
    # 3.1 V
    ("3.1 V", REF, b"V", ok(C.Version)),
    ("3.1 V x", REF, b"V x", ECode.PARSE_NARGS),
    ("3.1 Vx", REF, b"Vx", ECode.PARSE_MODS),
    # 3.2 VF
    ("3.2 VF base", REF, b"VF 20040107", ok(C.VersionFeature, datecode="20040107")),
    ("3.2 VF moh", REF, b"VF 20050322", ok(C.VersionFeature, datecode="20050322")),
    ("3.2 VF unknown", REF, b"VF 19990101", ok(C.VersionFeature, datecode="19990101")),
    ("3.2 VF noarg", REF, b"VF", ECode.PARSE_NARGS),
    ("3.2 Vf", REF, b"Vf 20081224", ok(C.VersionFeature, datecode="20081224")),
    # 3.3 U
    (
        "3.3 U call1",
        REF,
        b"U call1 127.0.0.1 30000 ftag1",
        ok(
            U,
            lookup=False,
            call_id="call1",
            addr="127.0.0.1",
            port="30000",
            from_tag="ftag1",
            to_tag=None,
            remote=("127.0.0.1", 30000),
            on_hold=False,
            notify_socket=None,
            notify_tag=None,
            subcommands=(),
        ),
    ),
    (
        "3.3 Uc",
        REF,
        b"Uc0,8,101 call3 127.0.0.1 30000 ftag",
        ok(U, mods__codecs=(0, 8, 101), mods__codecs_text="0,8,101"),
    ),
    ("3.3 UZ20", REF, b"UZ20 call4 127.0.0.1 30000 ftag", ok(U, mods__ptime=20)),
    ("3.3 UA", REF, b"UA call5 127.0.0.1 30000 ftag", ok(U, mods__asymmetric=True)),
    ("3.3 UW", REF, b"UW call6 127.0.0.1 30000 ftag", ok(U, mods__weak=True)),
    (
        "3.3 hold",
        REF,
        b"U call11 0.0.0.0 30000 ftag",
        ok(U, on_hold=True, remote=None),
    ),
    ("3.3 port 0", REF, b"U call12c 127.0.0.1 0 ftag", ok(U, remote=("127.0.0.1", 0))),
    ("3.3 U6 no v6", REF, b"U6 call2 ::1 30000 ftag", ECode.INVLARG_6),
    ("3.3 Ucx", REF, b"Ucx call3 127.0.0.1 30000 ftag", ECode.PARSE_14),
    ("3.3 UZ0", REF, b"UZ0 call4 127.0.0.1 30000 ftag", ECode.PARSE_13),
    ("3.3 UZ1000", REF, b"UZ1000 call4 127.0.0.1 30000 ftag", ECode.PARSE_13),
    ("3.3 UE", REF, b"UE call7 127.0.0.1 30000 ftag", ECode.PARSE_11),
    ("3.3 UI", REF, b"UI call7 127.0.0.1 30000 ftag", ECode.PARSE_12),
    # E72 comes from the bind, at run time: the parser accepts it.
    ("3.3 UL10.9.9.9", REF, b"UL10.9.9.9 call8b 127.0.0.1 30000 ftag", ok(U, mods__local_addr="10.9.9.9")),
    ("3.3 UQ", REF, b"UQ call10 127.0.0.1 30000 ftag", ECode.INVLARG_5),
    ("3.3 garbage addr", REF, b"U call12 garbage 30000 ftag", ECode.INVLARG_7),
    ("3.3 notaport", REF, b"U call12 127.0.0.1 notaport ftag", ECode.INVLARG_7),
    ("3.3 4 args", REF, b"U call13 127.0.0.1 30000", ECode.PARSE_NARGS),
    ("3.3 9 args", REF, b"U call14 127.0.0.1 30000 ftag ttag sock tag extra", ECode.PARSE_NARGS),
    ("3.3 bad enc", REF, b"U ncall8 127.0.0.1 30000 ftagH unix:/x bad%zzenc", ECode.PARSE_10),
    (
        "3.3 unknown socket",
        REF,
        b"U ncall9 127.0.0.1 30000 ftag unix:/run/nonexist.sock tag5",
        ok(U, to_tag=None, notify_socket="unix:/run/nonexist.sock", notify_tag="tag5"),
    ),
    ("3.3 wildcard", PLAIN, b"U w1 127.0.0.1 1000 f", ok(U, remote=("127.0.0.1", 1000))),
    ("3.3 U6 label", V6, b"U6 a2 ::1 1000 f", ok(U, mods__ipv6=True, remote=("::1", 1000))),
    ("3.3 Ul{lo2}", LBL, b"Ul{lo2} a3 127.0.0.1 1000 f", ok(U, mods__local_label="lo2")),
    ("3.3 Ul{nosuch}", LBL, b"Ul{nosuch} a4 127.0.0.1 1000 f", ECode.INVLARG_1),
    ("3.3 UIE", BRIDGE, b"UIE brE 127.0.0.1 38000 fA", ok(U, mods__ifaces=(0, 1))),
    ("3.3 UEI", BRIDGE, b"UEI brD 127.0.0.1 38000 fA", ok(U, mods__ifaces=(1, 0))),
    ("3.3 UIEE", BRIDGE, b"UIEE brF 127.0.0.1 38000 fA", ECode.PARSE_11),
    ("3.3 re-invite", REF, b"U call1 127.0.0.1 30002 ttag1 ftag1", ok(U, from_tag="ttag1", to_tag="ftag1")),
    ("3.3 Un", REF, b"Un call1n 127.0.0.1 30002 ftagn", ok(U, mods__new_port=True)),
    ("3.3 US", REF, b"US call 127.0.0.1 30002 ftag", ok(U, mods__asymmetric=False)),
    # the Kamailio 7-argument trap: from-tag, notify socket, notify tag
    (
        "3.3 kamailio 7",
        REF,
        b"U c 127.0.0.1 30000 ftag;1 ttag;1 /var/run/k.sock",
        ok(U, from_tag="ftag;1", to_tag=None, notify_socket="ttag;1", notify_tag="/var/run/k.sock"),
    ),
    (
        "3.3 opensips 8",
        REF,
        b"U c 127.0.0.1 30000 ftag ttag tcp:127.0.0.1:9999 17.42",
        ok(U, to_tag="ttag", notify_socket="tcp:127.0.0.1:9999", notify_tag="17.42"),
    ),
    # 3.4 L
    (
        "3.4 L",
        REF,
        b"L call1 127.0.0.1 30002 ftag1 ttag1",
        ok(L, lookup=True, from_tag="ftag1", to_tag="ttag1", remote=("127.0.0.1", 30002)),
    ),
    ("3.4 L no session", REF, b"L callX 127.0.0.1 30000 ftag", ok(L, lookup=True, to_tag=None)),
    ("3.4 L swapped", REF, b"L call1 127.0.0.1 30000 ttag1 ftag1", ok(L, from_tag="ttag1")),
    ("3.4 Ln", REF, b"Ln call1n 127.0.0.1 30002 ftagn ttagn", ok(L, lookup=True, mods__new_port=True)),
    ("3.4 L 7 args", REF, b"L c 127.0.0.1 30002 f t sock tag", ECode.PARSE_NARGS),
    # 3.5 D
    (
        "3.5 D",
        REF,
        b"D call1 ftag1 ttag1",
        ok(C.Delete, call_id="call1", from_tag="ftag1", to_tag="ttag1", weak=False),
    ),
    ("3.5 D nosuch", REF, b"D call1 nosuch", ok(C.Delete, to_tag=None)),
    ("3.5 prefix", REF, b"D cpcall fA", ok(C.Delete, from_tag="fA")),
    ("3.5 Dw", REF, b"Dw call1 ftag1", ok(C.Delete, weak=True)),
    # 3.6 X
    ("3.6 X", REF, b"X", ok(C.DeleteAll)),
    ("3.6 x y z", REF, b"x y z", ECode.PARSE_NARGS),
    # 3.7 I
    ("3.7 Ib", REF, b"Ib", ok(C.Info, brief=True, load=False)),
    ("3.7 Il", REF, b"Il", ok(C.Info, brief=False, load=True)),
    # 3.8 G
    (
        "3.8 Gv",
        REF,
        b"Gv nsess_created ncmds_rcvd",
        ok(C.Stats, verbose=True, names=("nsess_created", "ncmds_rcvd")),
    ),
    (
        "3.8 G doubles",
        REF,
        b"G nsess_created pps_in total_duration",
        ok(C.Stats, verbose=False, names=("nsess_created", "pps_in", "total_duration")),
    ),
    ("3.8 G alone", REF, b"G", ok(C.Stats, verbose=False, names=())),
    ("3.8 G nosuch", REF, b"G nosuch", ECode.STSFAIL),
    ("3.8 Gx", REF, b"Gx", ECode.PARSE_5),
    # 3.9 Q
    (
        "3.9 Q",
        REF,
        b"Q call1 ftag1 ttag1",
        ok(C.Query, call_id="call1", from_tag="ftag1", to_tag="ttag1", verbose=False, names=()),
    ),
    ("3.9 Qv", REF, b"Qv call1 ftag1 ttag1", ok(C.Query, verbose=True)),
    (
        "3.9 Q ten names",
        REF,
        b"Q call1 ftag1 ttag1 ttl npkts_ina npkts_ino nrelayed ndropped rtpa_nsent "
        b"rtpa_nrcvd rtpa_ndups rtpa_nlost rtpa_perrs",
        ok(
            C.Query,
            names=(
                "ttl",
                "npkts_ina",
                "npkts_ino",
                "nrelayed",
                "ndropped",
                "rtpa_nsent",
                "rtpa_nrcvd",
                "rtpa_ndups",
                "rtpa_nlost",
                "rtpa_perrs",
            ),
        ),
    ),
    (
        "3.9 Qv doubles",
        REF,
        b"Qv call1 ftag1 ttag1 ttl longest_ipi rtpa_jlast rtpa_jmax rtpa_javg",
        ok(C.Query, verbose=True, names=("ttl", "longest_ipi", "rtpa_jlast", "rtpa_jmax", "rtpa_javg")),
    ),
    ("3.9 Q no to", REF, b"Q call1 ftag1", ok(C.Query, to_tag=None)),
    ("3.9 Q bogus", REF, b"Q call1 ftag1 ttag1 bogus", ECode.QRYFAIL),
    ("3.9 Qx", REF, b"Qx call1 ftag1 ttag1", ECode.PARSE_8),
    ("3.9 Q nosuch", REF, b"Q call1 nosuch", ok(C.Query, from_tag="nosuch")),
    ("3.9 Q kamailio", REF, b"Q callid ftag;1 ttag", ok(C.Query, from_tag="ftag;1", to_tag="ttag")),
    # 3.10 R
    ("3.10 R", REF, b"R reccall fA", ok(C.Record, call_id="reccall", from_tag="fA", to_tag=None)),
    ("3.10 R to", REF, b"R reccall fA tB", ok(C.Record, to_tag="tB", single=False)),
    ("3.10 R swapped", REF, b"R cp2 tB fA", ok(C.Record, from_tag="tB", to_tag="fA")),
    ("3.10 Rs", REF, b"Rs pc tB fA", ok(C.Record, single=True)),
    ("3.10 RP", REF, b"RP reccall fA", ECode.PARSE_2),
    ("3.10 Rx", REF, b"Rx reccall fA", ECode.PARSE_3),
    # 3.11 C
    (
        "3.11 C udp",
        REF,
        b"C cpcall udp:127.0.0.1:37000 fA;1 tB;1",
        ok(
            C.Copy,
            call_id="cpcall",
            target="udp:127.0.0.1:37000",
            from_tag="fA;1",
            to_tag="tB;1",
            single=False,
            reply_port=False,
        ),
    ),
    ("3.11 CP", REF, b"CP cpcall udp:127.0.0.1:37000 tB;1 fA;1", ok(C.Copy, reply_port=True)),
    ("3.11 C exact", REF, b"C reccall udp:127.0.0.1:35000 fA tB", ok(C.Copy, from_tag="fA")),
    ("3.11 C file", REF, b"C cp2 myrec fA;1 tB;1", ok(C.Copy, target="myrec")),
    # 3.12 N
    ("3.12 N", REF, b"N reccall fA tB", ok(C.NoRecord, all=False, to_tag="tB")),
    ("3.12 NA", REF, b"NA reccall fA tB", ok(C.NoRecord, all=True)),
    ("3.12 NAx", REF, b"NAx reccall fA tB", ECode.PARSE_2),
    ("3.12 Nx", REF, b"Nx reccall fA tB", ECode.PARSE_3),
    # 3.13 P
    (
        "3.13 P",
        REF,
        b"P pcall /tmp/ringback 8,0 fA;1 tB;1",
        ok(
            C.Play,
            call_id="pcall",
            prompt="/tmp/ringback",
            codecs="8,0",
            from_tag="fA;1",
            to_tag="tB;1",
            count=1,
        ),
    ),
    ("3.13 P0", REF, b"P0 pcall ringback 0 fA", ok(C.Play, count=0, to_tag=None)),
    ("3.13 P-1", REF, b"P-1 pcall ringback session fA tB", ok(C.Play, count=-1, codecs="session")),
    ("3.13 Px", REF, b"Px pcall ringback 0 fA", ECode.PARSE_6),
    ("3.13 P 99", REF, b"P pcall ringback 99 fA tB", ok(C.Play, codecs="99")),
    ("3.13 P kamailio", REF, b"P3 cid prompt session ftag;1 ttag;1", ok(C.Play, count=3)),
    # 3.14 S
    ("3.14 S", REF, b"S call fA;1 tB;1", ok(C.StopPlay, from_tag="fA;1", to_tag="tB;1")),
    ("3.14 Sx", REF, b"Sx call fA", ECode.PARSE_MODS),
    # 3.15
    ("3.15 Z", REF, b"Z", ECode.CMDUNKN),
    ("3.15 abc", REF, b"abc", ECode.CMDUNKN),
    # 4 sub-commands
    (
        "4 U&&L",
        REF,
        b"U sc1 127.0.0.1 12345 f1 t1 && L 127.0.0.1 54321",
        ok(
            U,
            to_tag="t1",
            subcommands=(
                C.SubLookup(addr="127.0.0.1", port="54321", remote=("127.0.0.1", 54321), on_hold=False),
            ),
        ),
    ),
    ("4 U&&L no to-tag", REF, b"U sc1 127.0.0.1 12345 f1 && L 127.0.0.1 54321", ECode.PARSE_SUBC),
    ("4 V&&V", REF, b"V && V", ECode.PARSE_SUBC),
    ("4 D&&G", REF, b"D sc1 f1 t1 && G nsess_created", ECode.PARSE_SUBC),
    ("4 Q&&D", REF, b"Q sc1 f1 t1 && D", ok(C.Query, subcommands=(C.SubDelete(weak=False),))),
    (
        "4 S ttl",
        REF,
        b"U sc2 127.0.0.1 12345 f2 t2 && S ttl=30",
        ok(U, subcommands=(C.SubSet(reverse=False, ttl=30, tos=None),)),
    ),
    (
        "4 S tos && L",
        REF,
        b"U sc4 127.0.0.1 12345 f4 t4 && S tos=16 && L 127.0.0.1 5000",
        ok(
            U,
            subcommands=(
                C.SubSet(reverse=False, ttl=None, tos=16),
                C.SubLookup(addr="127.0.0.1", port="5000", remote=("127.0.0.1", 5000), on_hold=False),
            ),
        ),
    ),
    ("4 S bad", REF, b"U sc2 127.0.0.1 12345 f2 t2 && S ttl=abc", ECode.PARSE_SUBC),
]


@pytest.mark.parametrize("env,data,expected", [t[1:] for t in OBSERVED], ids=[t[0] for t in OBSERVED])
def test_observed(env: ParseEnv, data: bytes, expected: Any) -> None:
    check(data, env, expected)


# ---------------------------------------------------------------------------
# our own vectors: every E-code the parser produces, and check order


def _n_args(n: int) -> bytes:
    return b" ".join(b"a%d" % i for i in range(n))


OWN: list[tuple[str, ParseEnv, bytes, Any]] = [
    # --- E5: splitting
    ("E5 empty", PLAIN, b"", ECode.PARSE_1),
    ("E5 blanks", PLAIN, b" \t\r\n ", ECode.PARSE_1),
    ("E5 NUL", PLAIN, b"V\x00", ECode.PARSE_1),
    ("E5 NUL in arg", PLAIN, b"D call f\x00oo", ECode.PARSE_1),
    ("E5 NUL beats E0", PLAIN, b"Z a\x00", ECode.PARSE_1),
    ("E5 leading &&", PLAIN, b"&& V", ECode.PARSE_1),
    ("E5 empty sub", PLAIN, b"Q c f t &&", ECode.PARSE_1),
    ("E5 empty sub middle", PLAIN, b"Q c f t && && D", ECode.PARSE_1),
    ("E5 too many args", PLAIN, b"G " + _n_args(MAX_ARGS), ECode.PARSE_1),
    ("E5 too many sub args", PLAIN, b"Q c f t && D " + _n_args(MAX_ARGS), ECode.PARSE_1),
    ("E5 16 subs", PLAIN, b"Q c f t" + b" && D" * (MAX_SUBCOMMANDS + 1), ECode.PARSE_1),
    ("E5 beats E0", PLAIN, b"Z " + _n_args(MAX_ARGS), ECode.PARSE_1),
    # --- E0 / E1 / E2 / E3 (generic table, in that order)
    ("E0 letter", PLAIN, b"Y", ECode.CMDUNKN),
    ("E0 non-ascii", PLAIN, b"\xc3\xa9 x", ECode.CMDUNKN),
    ("E0 beats E1", PLAIN, b"Kx a b c d e f g h i", ECode.CMDUNKN),
    (
        "E1 G 23 args ok",
        PLAIN,
        b"G" + b" nsess_created" * (MAX_ARGS - 1),
        ok(C.Stats, names=("nsess_created",) * (MAX_ARGS - 1)),
    ),
    ("E1 D", PLAIN, b"D c", ECode.PARSE_NARGS),
    ("E1 D 5", PLAIN, b"D c f t x", ECode.PARSE_NARGS),
    ("E1 R", PLAIN, b"R c f t x", ECode.PARSE_NARGS),
    ("E1 C", PLAIN, b"C c tgt", ECode.PARSE_NARGS),
    ("E1 N", PLAIN, b"N c", ECode.PARSE_NARGS),
    ("E1 P", PLAIN, b"P c p 0", ECode.PARSE_NARGS),
    ("E1 S", PLAIN, b"S c f t x", ECode.PARSE_NARGS),
    ("E1 I", PLAIN, b"I x", ECode.PARSE_NARGS),
    ("E1 X", PLAIN, b"X x", ECode.PARSE_NARGS),
    ("E1 VF 3", PLAIN, b"VF 1 2", ECode.PARSE_NARGS),
    ("E1 Q", PLAIN, b"Q c", ECode.PARSE_NARGS),
    (
        "E1 Q names max ok",
        PLAIN,
        b"Q c f t" + b" ttl" * QUERY_MAX_NAMES,
        ok(C.Query, names=("ttl",) * QUERY_MAX_NAMES),
    ),
    ("E1 Q too many names", PLAIN, b"Q c f t" + b" ttl" * (QUERY_MAX_NAMES + 1), ECode.PARSE_NARGS),
    ("E1 beats E2", PLAIN, b"Vx y", ECode.PARSE_NARGS),
    ("E1 beats E18", PLAIN, b"Iz y", ECode.PARSE_NARGS),
    ("E1 beats E35", PLAIN, b"UQ c 127.0.0.1 1", ECode.PARSE_NARGS),
    ("E1 beats E3", PLAIN, b"D c && D", ECode.PARSE_NARGS),
    ("E2 X", PLAIN, b"Xa", ECode.PARSE_MODS),
    ("E2 VF", PLAIN, b"VFx 20040107", ECode.PARSE_MODS),
    ("E2 S", PLAIN, b"Sr c f", ECode.PARSE_MODS),
    ("E2 beats E3", PLAIN, b"Xa && D", ECode.PARSE_MODS),
    ("E3 X", PLAIN, b"X && D", ECode.PARSE_SUBC),
    ("E3 I", PLAIN, b"I && D", ECode.PARSE_SUBC),
    ("E3 G", PLAIN, b"G && D", ECode.PARSE_SUBC),
    ("E3 P", PLAIN, b"P c p 0 f && D", ECode.PARSE_SUBC),
    ("E3 R", PLAIN, b"R c f && D", ECode.PARSE_SUBC),
    ("E3 beats E9", PLAIN, b"Gx && D", ECode.PARSE_SUBC),
    ("E3 beats E8", PLAIN, b"Dx c f && D", ECode.PARSE_SUBC),
    # --- per-command modifiers
    ("E6 Rp lower", PLAIN, b"Rp c f", ECode.PARSE_2),
    ("E6 Rsp", PLAIN, b"Rsp c f", ECode.PARSE_2),
    ("E7 Rxp", PLAIN, b"Rxp c f", ECode.PARSE_3),
    ("E7 Cx", PLAIN, b"Cx c tgt f", ECode.PARSE_3),
    ("C sp", PLAIN, b"Csp c tgt f t", ok(C.Copy, single=True, reply_port=True)),
    ("E6 Nax", PLAIN, b"Nax c f", ECode.PARSE_2),
    ("E7 Nxa", PLAIN, b"Nxa c f", ECode.PARSE_3),
    ("N a lower", PLAIN, b"na c f", ok(C.NoRecord, all=True)),
    ("E8 Dx", PLAIN, b"Dx c f", ECode.PARSE_4),
    ("E8 Dwx", PLAIN, b"Dwx c f", ECode.PARSE_4),
    ("D W upper", PLAIN, b"dW c f", ok(C.Delete, weak=True)),
    ("E9 Gvx", PLAIN, b"Gvx nsess_created", ECode.PARSE_5),
    ("E9 beats E68", PLAIN, b"Gx nosuch", ECode.PARSE_5),
    ("G V upper", PLAIN, b"gV ncmds_rcvd", ok(C.Stats, verbose=True)),
    ("E68 second", PLAIN, b"G nsess_created nosuch", ECode.STSFAIL),
    ("E68 case", PLAIN, b"G NSESS_CREATED", ECode.STSFAIL),
    ("E17 P+", PLAIN, b"P+ c p 0 f", ECode.PARSE_6),
    ("E17 P-", PLAIN, b"P- c p 0 f", ECode.PARSE_6),
    ("E17 P5x", PLAIN, b"P5x c p 0 f", ECode.PARSE_6),
    ("P+5", PLAIN, b"P+5 c p 0 f", ok(C.Play, count=5)),
    ("P big wraps like C", PLAIN, b"P4294967298 c p 0 f", ok(C.Play, count=2)),
    ("E18 Ix", PLAIN, b"Ix", ECode.PARSE_7),
    ("E18 Ibx", PLAIN, b"Ibx", ECode.PARSE_7),
    ("I BL", PLAIN, b"iBL", ok(C.Info, brief=True, load=True)),
    ("E19 Qvx", PLAIN, b"Qvx c f t", ECode.PARSE_8),
    ("E19 beats E62", PLAIN, b"Qx c f t bogus", ECode.PARSE_8),
    ("E3 beats E19", PLAIN, b"Qx c f t && X", ECode.PARSE_SUBC),
    ("E62 later name", PLAIN, b"Q c f t ttl bogus", ECode.QRYFAIL),
    ("VF lower", PLAIN, b"vf 20040107", ok(C.VersionFeature, datecode="20040107")),
    ("V lower", PLAIN, b"v", ok(C.Version)),
    # --- U/L modifiers
    ("E35 U", PLAIN, b"Ux c 127.0.0.1 1 f", ECode.INVLARG_5),
    ("E35 after good", PLAIN, b"UASWNQ c 127.0.0.1 1 f", ECode.INVLARG_5),
    ("E35 first wins", BRIDGE, b"UQE c 127.0.0.1 1 f", ECode.INVLARG_5),
    ("E11 first wins", PLAIN, b"UEQ c 127.0.0.1 1 f", ECode.PARSE_11),
    ("E12 third letter", BRIDGE, b"UIEI c 127.0.0.1 1 f", ECode.PARSE_12),
    ("E11 lower", PLAIN, b"ue c 127.0.0.1 1 f", ECode.PARSE_11),
    ("E12 L", PLAIN, b"Li c 127.0.0.1 1 f t", ECode.PARSE_12),
    ("II bridge", BRIDGE, b"UII c 127.0.0.1 1 f", ok(U, mods__ifaces=(0, 0))),
    ("E13 Z", PLAIN, b"UZ c 127.0.0.1 1 f", ECode.PARSE_13),
    ("E13 Z-5", PLAIN, b"UZ-5 c 127.0.0.1 1 f", ECode.PARSE_13),
    ("Z1", PLAIN, b"UZ1 c 127.0.0.1 1 f", ok(U, mods__ptime=1)),
    ("Z999", PLAIN, b"Uz999 c 127.0.0.1 1 f", ok(U, mods__ptime=999)),
    ("Z+20", PLAIN, b"UZ+20 c 127.0.0.1 1 f", ok(U, mods__ptime=20)),
    ("Z greedy then A", PLAIN, b"UZ20A c 127.0.0.1 1 f", ok(U, mods__ptime=20, mods__asymmetric=True)),
    ("E14 C empty", PLAIN, b"UCA c 127.0.0.1 1 f", ECode.PARSE_14),
    ("E14 C twice", PLAIN, b"Uc0c8 c 127.0.0.1 1 f", ECode.PARSE_14),
    (
        "C greedy then A",
        PLAIN,
        b"Uc0,8,101A c 127.0.0.1 1 f",
        ok(U, mods__codecs=(0, 8, 101), mods__asymmetric=True),
    ),
    (
        "kamailio mods",
        PLAIN,
        b"USZ20c0,8,101 c 127.0.0.1 1 f;1",
        ok(U, mods__asymmetric=False, mods__ptime=20, mods__codecs=(0, 8, 101)),
    ),
    ("A then S", PLAIN, b"UAS c 127.0.0.1 1 f", ok(U, mods__asymmetric=False)),
    ("E15 L nothing", PLAIN, b"UL c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E15 L letter", PLAIN, b"ULA c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E15 L open bracket", PLAIN, b"UL[::1 c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E15 L empty brackets", PLAIN, b"UL[] c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E15 L{}", LBL, b"UL{} c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E15 L{ unclosed", LBL, b"UL{lo2 c 127.0.0.1 1 f", ECode.PARSE_15),
    ("E31 L bad v4", PLAIN, b"UL1.2.3.4.5 c 127.0.0.1 1 f", ECode.INVLARG_1),
    ("E31 L bad v6", PLAIN, b"UL[1:2:3:4:5] c 127.0.0.1 1 f", ECode.INVLARG_1),
    ("E31 beats E35", PLAIN, b"UL999.1.1.1Q c 127.0.0.1 1 f", ECode.INVLARG_1),
    ("L v6", PLAIN, b"UL[::1]A c 127.0.0.1 1 f", ok(U, mods__local_addr="::1", mods__asymmetric=True)),
    ("L label then W", LBL, b"Ul{lo2}W c 127.0.0.1 1 f", ok(U, mods__local_label="lo2", mods__weak=True)),
    (
        "L then R: last wins",
        PLAIN,
        b"UL127.0.0.1R10.0.0.1 c 127.0.0.1 1 f",
        ok(U, mods__local_addr=None, mods__remote_addr="10.0.0.1"),
    ),
    ("E16 R nothing", PLAIN, b"UR c 127.0.0.1 1 f", ECode.PARSE_16),
    ("E16 R bracket garbage", PLAIN, b"UR[zz] c 127.0.0.1 1 f", ECode.PARSE_16),
    ("E32 R bad", PLAIN, b"UR999.1.1.1 c 127.0.0.1 1 f", ECode.INVLARG_2),
    ("R ok", PLAIN, b"Ur192.0.2.1 c 127.0.0.1 1 f", ok(U, mods__remote_addr="192.0.2.1")),
    # --- address family (E36) and address/port (E37)
    ("E36 U6", PLAIN, b"U6 c ::1 1 f", ECode.INVLARG_6),
    ("E36 v4 on v6-only", V6ONLY, b"U c 127.0.0.1 1 f", ECode.INVLARG_6),
    ("v6 on v6-only", V6ONLY, b"U6 c ::1 1 f", ok(U, remote=("::1", 1))),
    ("E35 beats E36", PLAIN, b"U6Q c ::1 1 f", ECode.INVLARG_5),
    ("E36 skipped with L", PLAIN, b"U6L127.0.0.1 c ::1 1 f", ok(U, remote=("::1", 1))),
    ("E36 skipped with I/E", BRIDGE, b"U6IE c ::1 1 f", ok(U, mods__ifaces=(0, 1))),
    ("E36 skipped with label", LBL, b"U6l{lo2} c ::1 1 f", ok(U, mods__local_label="lo2")),
    ("E36 beats E37", PLAIN, b"U6 c garbage!! 1 f", ECode.INVLARG_6),
    # The port is getaddrinfo's service argument (glibc): strtoul() then
    # htons(), so 65536 wraps to 0 and a sign is accepted; a negative int
    # or any other text is a UDP service name (SERVICES below knows "sip").
    ("port wraps at 65536", PLAIN, b"U c 127.0.0.1 65536 f", ok(U, remote=("127.0.0.1", 0))),
    ("port 65537", PLAIN, b"U c 127.0.0.1 65537 f", ok(U, remote=("127.0.0.1", 1))),
    ("port plus sign", PLAIN, b"U c 127.0.0.1 +36000 f", ok(U, remote=("127.0.0.1", 36000))),
    ("port 2^31-1", PLAIN, b"U c 127.0.0.1 2147483647 f", ok(U, remote=("127.0.0.1", 65535))),
    ("E37 port 2^31", PLAIN, b"U c 127.0.0.1 2147483648 f", ECode.INVLARG_7),
    ("port 2^32 wraps", PLAIN, b"U c 127.0.0.1 4294967296 f", ok(U, remote=("127.0.0.1", 0))),
    ("E37 port sign", PLAIN, b"U c 127.0.0.1 -1 f", ECode.INVLARG_7),
    ("port -4294967295", PLAIN, b"U c 127.0.0.1 -4294967295 f", ok(U, remote=("127.0.0.1", 1))),
    ("E37 service without table", PLAIN, b"U c 127.0.0.1 sip f", ECode.INVLARG_7),
    ("service name", SERVICES, b"U c 127.0.0.1 sip f", ok(U, remote=("127.0.0.1", 5060))),
    ("E37 unknown service", SERVICES, b"U c 127.0.0.1 nosuch f", ECode.INVLARG_7),
    ("E37 lone sign", SERVICES, b"U c 127.0.0.1 + f", ECode.INVLARG_7),
    ("port max", PLAIN, b"U c 127.0.0.1 65535 f", ok(U, remote=("127.0.0.1", 65535))),
    ("E37 bad quad", PLAIN, b"U c 256.1.1.1 1 f", ECode.INVLARG_7),
    ("E37 v6 in v4 mode", PLAIN, b"U c 2001:db8::1 1 f", ECode.INVLARG_7),
    ("E37 v4 in v6 mode", V6, b"U6 c 127.0.0.1 1 f", ECode.INVLARG_7),
    ("E37 hold bad port", PLAIN, b"U c 0.0.0.0 x f", ECode.INVLARG_7),
    ("E37 L", PLAIN, b"L c 127.0.0.1 port f t", ECode.INVLARG_7),
    ("short v4 ignored", PLAIN, b"U c ::1 1 f", ok(U, remote=None, on_hold=False)),
    ("long v4 ignored", PLAIN, b"U c 1234567890123456 x f", ok(U, remote=None, on_hold=False)),
    ("long v6 ignored", V6, b"U6 c " + b"1" * 46 + b" x f", ok(U, remote=None)),
    ("v6 hold", V6, b"U6 c :: 1 f", ok(U, on_hold=True, remote=None)),
    ("v6 normalised", V6, b"U6 c 2001:DB8:0:0::1 5 f", ok(U, remote=("2001:db8::1", 5))),
    ("v4 aton forms", PLAIN, b"U c 0x7f.0.0.1 5 f", ok(U, remote=("127.0.0.1", 5))),
    ("v4 octal", PLAIN, b"U c 010.0.0.1 5 f", ok(U, remote=("8.0.0.1", 5))),
    ("v4 mapped in v4 mode", PLAIN, b"U c ::ffff:1.2.3.4 5 f", ok(U, remote=("1.2.3.4", 5))),
    # --- notify (E10, E75)
    (
        "notify decode",
        NOTIFY,
        b"U c 127.0.0.1 1 f s a%20b+c%41",
        ok(U, notify_tag="a b cA", notify_socket="s"),
    ),
    ("E10 short", NOTIFY, b"U c 127.0.0.1 1 f t s tag%4", ECode.PARSE_10),
    ("E10 bare percent", NOTIFY, b"U c 127.0.0.1 1 f s %", ECode.PARSE_10),
    ("E10 beats E35", NOTIFY, b"UQ c 127.0.0.1 1 f s %zz", ECode.PARSE_10),
    ("E10 beats E75", PLAIN, b"U c 127.0.0.1 1 f s %zz", ECode.PARSE_10),
    ("E75 7 args", PLAIN, b"U c 127.0.0.1 1 f s tag", ECode.NSOFF),
    ("E75 8 args", PLAIN, b"U c 127.0.0.1 1 f t s tag", ECode.NSOFF),
    ("E37 beats E75", PLAIN, b"U c 127.0.0.1 x f s tag", ECode.INVLARG_7),
    ("E35 beats E75", PLAIN, b"UQ c 127.0.0.1 1 f s tag", ECode.INVLARG_5),
    ("E3 beats E75", PLAIN, b"U c 127.0.0.1 1 f t s tag && X", ECode.PARSE_SUBC),
    # --- sub-commands
    ("sub Dw", PLAIN, b"Q c f t && Dw", ok(C.Query, subcommands=(C.SubDelete(weak=True),))),
    ("sub D on L", PLAIN, b"L c 127.0.0.1 1 f t && d", ok(L, subcommands=(C.SubDelete(),))),
    ("sub Dx", PLAIN, b"Q c f t && Dx", ECode.PARSE_SUBC),
    ("sub D arg", PLAIN, b"Q c f t && D x", ECode.PARSE_SUBC),
    ("sub Sr", PLAIN, b"Q c f t && Sr ttl=5", ok(C.Query, subcommands=(C.SubSet(reverse=True, ttl=5),))),
    (
        "sub S other letter",
        PLAIN,
        b"Q c f t && Sx tos=5",
        ok(C.Query, subcommands=(C.SubSet(reverse=False, tos=5),)),
    ),
    ("sub S long word", PLAIN, b"Q c f t && Srr ttl=5", ECode.PARSE_SUBC),
    ("sub S no arg", PLAIN, b"Q c f t && S", ECode.PARSE_SUBC),
    ("sub S 2 args", PLAIN, b"Q c f t && S ttl=5 tos=5", ECode.PARSE_SUBC),
    ("sub S empty value", PLAIN, b"Q c f t && S ttl=", ECode.PARSE_SUBC),
    ("sub S zero", PLAIN, b"Q c f t && S ttl=0", ECode.PARSE_SUBC),
    ("sub S negative", PLAIN, b"Q c f t && S tos=-1", ECode.PARSE_SUBC),
    ("sub S junk", PLAIN, b"Q c f t && S ttl=5x", ECode.PARSE_SUBC),
    ("sub S case", PLAIN, b"Q c f t && S TTL=5", ECode.PARSE_SUBC),
    ("sub S other param", PLAIN, b"Q c f t && S foo=5", ECode.PARSE_SUBC),
    ("sub L on L", PLAIN, b"L c 127.0.0.1 1 f t && L 127.0.0.1 2", ECode.PARSE_SUBC),
    ("sub L on Q", PLAIN, b"Q c f t && L 127.0.0.1 2", ECode.PARSE_SUBC),
    ("sub L notify no to-tag", NOTIFY, b"U c 127.0.0.1 1 f s tag && L 127.0.0.1 2", ECode.PARSE_SUBC),
    (
        "sub L 8 args",
        NOTIFY,
        b"U c 127.0.0.1 1 f t s tag && L 127.0.0.1 2",
        ok(U, to_tag="t", subcommands=(C.SubLookup("127.0.0.1", "2", ("127.0.0.1", 2)),)),
    ),
    ("sub L short", PLAIN, b"U c 127.0.0.1 1 f t && L 127.0.0.1", ECode.PARSE_SUBC),
    ("sub L long", PLAIN, b"U c 127.0.0.1 1 f t && L 127.0.0.1 2 3", ECode.PARSE_SUBC),
    ("sub L bad port", PLAIN, b"U c 127.0.0.1 1 f t && L 127.0.0.1 notaport", ECode.PARSE_SUBC),
    ("sub L bad mod", PLAIN, b"U c 127.0.0.1 1 f t && LQ 127.0.0.1 2", ECode.PARSE_SUBC),
    ("sub L6 no v6", PLAIN, b"U c 127.0.0.1 1 f t && L6 ::1 2", ECode.PARSE_SUBC),
    (
        "sub L hold",
        PLAIN,
        b"U c 127.0.0.1 1 f t && L 0.0.0.0 2",
        ok(U, subcommands=(C.SubLookup("0.0.0.0", "2", None, on_hold=True),)),
    ),
    (
        "sub C",
        PLAIN,
        b"U c 127.0.0.1 1 f t && C c2 f2 t2",
        ok(U, subcommands=(C.SubCopy("c2", "f2", "t2"),)),
    ),
    (
        "sub c lower",
        PLAIN,
        b"U c 127.0.0.1 1 f t && c c2 f2 t2",
        ok(U, subcommands=(C.SubCopy("c2", "f2", "t2"),)),
    ),
    ("sub C no to-tag", PLAIN, b"U c 127.0.0.1 1 f && C c2 f2 t2", ECode.PARSE_SUBC),
    ("sub C on L", PLAIN, b"L c 127.0.0.1 1 f t && C c2 f2 t2", ECode.PARSE_SUBC),
    ("sub C on Q", PLAIN, b"Q c f t && C c2 f2 t2", ECode.PARSE_SUBC),
    ("sub C short", PLAIN, b"U c 127.0.0.1 1 f t && C c2 f2", ECode.PARSE_SUBC),
    ("sub C long", PLAIN, b"U c 127.0.0.1 1 f t && C c2 f2 t2 x", ECode.PARSE_SUBC),
    ("sub C modifier", PLAIN, b"U c 127.0.0.1 1 f t && Cs c2 f2 t2", ECode.PARSE_SUBC),
    ("sub M", PLAIN, b"U c 127.0.0.1 1 f t && M1:1", ECode.PARSE_SUBC),
    ("sub unknown", PLAIN, b"Q c f t && G", ECode.PARSE_SUBC),
    ("main error beats sub", PLAIN, b"UQ c 127.0.0.1 1 f t && Z", ECode.INVLARG_5),
    (
        "15 subs",
        PLAIN,
        b"Q c f t" + b" && D" * MAX_SUBCOMMANDS,
        ok(C.Query, subcommands=(C.SubDelete(),) * MAX_SUBCOMMANDS),
    ),
    ("sub args max", PLAIN, b"Q c f t && D " + _n_args(MAX_ARGS - 1), ECode.PARSE_SUBC),
    # --- text handling
    ("media numbers kept", PLAIN, b"U c 127.0.0.1 1 f;1 t;1", ok(U, from_tag="f;1", to_tag="t;1")),
    (
        "non-utf8 round trip",
        PLAIN,
        b"D \xff\xfe f\xc3",
        ok(
            C.Delete,
            call_id=b"\xff\xfe".decode("utf-8", "surrogateescape"),
            from_tag=b"f\xc3".decode("utf-8", "surrogateescape"),
        ),
    ),
    ("utf8 call-id", PLAIN, "D caf\u00e9 f".encode(), ok(C.Delete, call_id="caf\u00e9")),
    ("bytearray input", PLAIN, bytearray(b"V"), ok(C.Version)),
]


@pytest.mark.parametrize("env,data,expected", [t[1:] for t in OWN], ids=[t[0] for t in OWN])
def test_own(env: ParseEnv, data: bytes, expected: Any) -> None:
    check(data, env, expected)


def test_every_reachable_code_is_covered() -> None:
    """Every E-code the parser can raise appears in the tables above."""
    produced = {e for *_, e in OBSERVED + OWN if isinstance(e, int)}
    expected = {
        ECode.CMDUNKN,
        ECode.PARSE_NARGS,
        ECode.PARSE_MODS,
        ECode.PARSE_SUBC,
        ECode.PARSE_1,
        ECode.PARSE_2,
        ECode.PARSE_3,
        ECode.PARSE_4,
        ECode.PARSE_5,
        ECode.PARSE_10,
        ECode.PARSE_11,
        ECode.PARSE_12,
        ECode.PARSE_13,
        ECode.PARSE_14,
        ECode.PARSE_15,
        ECode.PARSE_16,
        ECode.PARSE_6,
        ECode.PARSE_7,
        ECode.PARSE_8,
        ECode.INVLARG_1,
        ECode.INVLARG_2,
        ECode.INVLARG_5,
        ECode.INVLARG_6,
        ECode.INVLARG_7,
        ECode.QRYFAIL,
        ECode.STSFAIL,
        ECode.NSOFF,
    }
    assert expected <= produced


def test_counter_tables_accepted() -> None:
    names = list(GLOBAL_COUNTERS)[: MAX_ARGS - 1]
    got = parse_command(("Gv " + " ".join(names)).encode(), PLAIN)
    assert got == C.Stats(verbose=True, names=tuple(names))
    for name in QUERY_COUNTERS:
        q = parse_command(f"Q c f t {name}".encode(), PLAIN)
        assert q.names == (name,)


def test_strings_round_trip_to_wire_bytes() -> None:
    raw = [b"c\x80all", b"f\xff;1", b"t\xe2\x82", b"s\xc0", b"n%41g"]
    data = b"U " + raw[0] + b" 127.0.0.1 1000 " + raw[1] + b" " + raw[2] + b" " + raw[3] + b" " + raw[4]
    got = parse_command(data, NOTIFY)
    back = [got.call_id, got.from_tag, got.to_tag, got.notify_socket]
    assert [s.encode("utf-8", "surrogateescape") for s in back] == raw[:4]
    assert got.notify_tag == "nAg"


# ---------------------------------------------------------------------------
# never anything but RtppError, and only known codes

ENVS = st.builds(
    ParseEnv,
    bridge=st.booleans(),
    has_ipv4=st.booleans(),
    has_ipv6=st.booleans(),
    labels=st.frozensets(st.sampled_from(["lo2", "a", "v6lab"]), max_size=2),
    notify=st.booleans(),
)

VALID = [
    b"V",
    b"VF 20081224",
    b"I",
    b"Ibl",
    b"X",
    b"Gv nsess_created pps_in",
    b"U call1 127.0.0.1 30000 ftag1",
    b"Uc0,8,101Z20 c 127.0.0.1 30000 f;1 t;1",
    b"UIEl{lo2}L[::1]R10.0.0.1 c 0.0.0.0 0 f t s a%20b",
    b"U6 c ::1 4000 f t && S ttl=30 && L 127.0.0.1 5000 && Dw",
    b"L call1 127.0.0.1 30002 ftag1 ttag1",
    b"Ln c ::ffff:1.2.3.4 1 f t",
    b"D c f t",
    b"Dw c f",
    b"Q c f t ttl rtpa_jmax && D",
    b"Qv c f",
    b"R c f t",
    b"Rs c f",
    b"Csp c udp:127.0.0.1:5000 f t",
    b"Na c f t",
    b"P-1 c prompt 0,8 f t",
    b"P c prompt session f",
    b"S c f t",
]


def _assert_only_rtpp_error(data: bytes, env: ParseEnv) -> None:
    try:
        parse_command(data, env)
    except RtppError as exc:
        assert exc.code in ECODE_VALUES, exc.code


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=300), env=ENVS)
def test_random_bytes(data: bytes, env: ParseEnv) -> None:
    _assert_only_rtpp_error(data, env)


_ALPHABET = b"0123456789abcdefxXAaEeIiSsWwZzCcLlRrNn6.,:[]{}%+-&; \t\r\n\x00\xff\xc3"


@FUZZ
@given(
    base=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["ins", "del", "rep", "dup"]),
            st.integers(min_value=0, max_value=400),
            st.sampled_from(list(_ALPHABET)),
        ),
        min_size=1,
        max_size=8,
    ),
    env=ENVS,
)
def test_mutated_commands(base: bytes, edits: list[tuple[str, int, int]], env: ParseEnv) -> None:
    buf = bytearray(base)
    for op, pos, ch in edits:
        pos %= len(buf) + 1
        if op == "ins":
            buf[pos:pos] = bytes([ch])
        elif op == "del" and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == "rep" and buf:
            buf[min(pos, len(buf) - 1)] = ch
        elif op == "dup":
            buf[pos:pos] = buf[pos : pos + 20]
    _assert_only_rtpp_error(bytes(buf), env)


_TOKENS = st.one_of(
    st.sampled_from(
        [
            b"&&",
            b"U",
            b"L",
            b"Q",
            b"D",
            b"S",
            b"Sr",
            b"ttl=5",
            b"tos=0",
            b"127.0.0.1",
            b"::1",
            b"0.0.0.0",
            b"65535",
            b"99999999999999999999999",
            b"f;1",
            b"%zz",
            b"UZ99999999999999999999",
            b"P-9999999999999999999999",
            b"Uc" + b"9" * 5000,
            b"UL" + b"1" * 5000,
            b"U6",
            b"ULl{lo2}",
            b"UR[" + b"f" * 100 + b"]",
        ]
    ),
    st.binary(min_size=1, max_size=12).filter(lambda b: not any(c in b" \t\r\n" for c in b)),
)


@FUZZ
@given(tokens=st.lists(_TOKENS, min_size=0, max_size=30), env=ENVS)
def test_token_soup(tokens: list[bytes], env: ParseEnv) -> None:
    _assert_only_rtpp_error(b" ".join(tokens), env)


def test_huge_numbers_do_not_crash() -> None:
    digits = b"9" * 10000
    for data in (
        b"UZ" + digits + b" c 127.0.0.1 1 f",
        b"Uc" + digits + b" c 127.0.0.1 1 f",
        b"P" + digits + b" c p 0 f",
        b"U c 127.0.0.1 " + digits + b" f",
        b"U c 1." + digits + b" 1 f",
        b"UL1." + digits + b" c 127.0.0.1 1 f",
        b"Q c f t && S ttl=" + digits,
        b"U6 c fe80::1%" + digits + b" 1 f",
    ):
        _assert_only_rtpp_error(data, V6)
