"""Control command parser: one command's bytes -> a frozen command object.

:func:`parse_command` takes one command without the UDP cookie and returns
one of the classes of :mod:`pyrtpproxy.commands`, or raises
:class:`~pyrtpproxy.ecodes.RtppError` carrying the E-code rtpproxy 3.2 gives
for the same text.  The checks run in rtpproxy's order, so that a command
with several faults gets the code of the first one rtpproxy would trip on:

1. splitting (E5: NUL in an argument, 24 arguments in a (sub)command,
   more than 15 sub-commands, an empty command or sub-command);
2. the generic table (E0 unknown letter, E1 argument count, E2 modifiers on
   a command without any, E3 sub-commands on a command without any);
3. the command's own options (modifiers, notify tag, addresses);
4. the sub-commands (any failure is E3);
5. checks rtpproxy makes when the command runs but that depend only on the
   text and the configuration (E75 for U, E19/E62 for Q, E68 for G).

Everything is done on bytes (lengths are byte lengths, as in C); strings in
the result are decoded as UTF-8 with ``surrogateescape``.  Nothing here does
I/O, and no input makes it raise anything but ``RtppError``.
"""

from __future__ import annotations

import re

from . import inet
from .commands import (
    Command,
    Copy,
    Delete,
    DeleteAll,
    Info,
    NoRecord,
    ParseEnv,
    Play,
    Query,
    Record,
    Stats,
    StopPlay,
    SubCommand,
    SubCopy,
    SubDelete,
    SubLookup,
    SubSet,
    ULMods,
    Update,
    Version,
    VersionFeature,
)
from .counters import GLOBAL_COUNTERS, QUERY_COUNTERS, QUERY_MAX_NAMES
from .ecodes import ECode, RtppError

__all__ = ["parse_command", "MAX_ARGS", "MAX_SUBCOMMANDS"]

# A (sub)command may hold at most this many arguments (command word
# included); reaching MAX_ARGS + 1 is E5.  rtpproxy's argument vector has
# 24 slots and fails as the 24th argument is stored, so 23 is the maximum.
MAX_ARGS = 23
MAX_SUBCOMMANDS = 15

_SEPARATORS = re.compile(rb"[ \t\r\n]+")
_AMPAMP = b"&&"
_DIGITS = b"0123456789"
_HEXDIGITS = b"0123456789abcdefABCDEF"
_C_SPACE = b" \t\n\v\f\r"  # isspace() in the C locale
_LONG_MIN = -(2**63)
_LONG_MAX = 2**63 - 1
_ULONG_MAX = 2**64 - 1
_V4MAPPED_PREFIX = bytes(10) + b"\xff\xff"

_E = ECode


def _err(code: ECode) -> RtppError:
    return RtppError(code)


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# small C-compatible helpers


_MAX_LEN: dict[tuple[int, int], int] = {}  # digits of (limit, base)


def _bounded_int(digits: bytes, base: int, limit: int) -> int:
    """``int(digits, base)``, or ``limit + 1`` when it would exceed
    ``limit`` (avoids converting huge digit strings)."""
    stripped = digits.lstrip(b"0")
    max_len = _MAX_LEN.get((limit, base))
    if max_len is None:
        max_len = _MAX_LEN[limit, base] = len(format(limit, "x" if base == 16 else "o" if base == 8 else "d"))
    if len(stripped) > max_len:
        return limit + 1
    if not stripped:
        return 0
    value = int(stripped, base)
    return value if value <= limit else limit + 1


def _strtol(b: bytes, start: int) -> tuple[int, int]:
    """C ``strtol(b + start, &end, 10)``: (value, end index).

    Leading C whitespace and one sign are accepted; without digits the
    end is ``start`` and the value 0; out-of-range values clamp to the
    64-bit ``long`` limits.
    """
    n = len(b)
    j = start
    while j < n and b[j] in _C_SPACE:
        j += 1
    neg = False
    if j < n and b[j] in b"+-":
        neg = b[j] == 0x2D
        j += 1
    k = j
    while k < n and b[k] in _DIGITS:
        k += 1
    if k == j:
        return 0, start
    limit = -_LONG_MIN if neg else _LONG_MAX
    value = _bounded_int(b[j:k], 10, limit)
    if value > limit:
        value = limit
    return (-value if neg else value), k


def _to_c_int(value: int) -> int:
    """Store a ``long`` into a 32-bit ``int`` (two's complement wrap)."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _atoi_safe(b: bytes) -> int | None:
    """rtpproxy's atoi_safe(): strtol over the whole string, as an int."""
    value, end = _strtol(b, 0)
    if end == 0 or end != len(b):
        return None
    return _to_c_int(value)


_AATON_PART = re.compile(rb"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_AATON_MAX = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rb"(?:" + _OCTET + rb"\.){3}" + _OCTET)


def _inet_aton_exact(b: bytes) -> int | None:
    """glibc's numeric IPv4 parser used by getaddrinfo(AI_NUMERICHOST):
    1 to 4 dot-separated parts, each decimal, octal (leading 0) or hex
    (0x); the last part fills the remaining bytes.  Returns the address
    as an integer, or None."""
    if _DOTTED_QUAD.fullmatch(b) is not None:  # the usual a.b.c.d, no leading zeros
        p0, p1, p2, p3 = b.split(b".")
        return (int(p0) << 24) | (int(p1) << 16) | (int(p2) << 8) | int(p3)
    parts: list[int] = []
    i = 0
    n = len(b)
    while True:
        if i >= n or b[i] not in _DIGITS:
            return None
        m = _AATON_PART.match(b, i)
        if m is None:  # pragma: no cover - a digit always matches
            return None
        text = m.group()
        if text[:2] in (b"0x", b"0X"):
            val = _bounded_int(text[2:], 16, 0xFFFFFFFF)
        elif text[:1] == b"0":
            val = _bounded_int(text, 8, 0xFFFFFFFF)
        else:
            val = _bounded_int(text, 10, 0xFFFFFFFF)
        if val > 0xFFFFFFFF:
            return None
        i = m.end()
        if i < n and b[i] == 0x2E:  # '.'
            if len(parts) > 2 or val > 0xFF:
                return None
            parts.append(val)
            i += 1
            continue
        break
    if i != n:
        return None
    if val > _AATON_MAX[len(parts)]:
        return None
    word = 0
    for k, p in enumerate(parts):
        word |= p << (24 - 8 * k)
    return word | val


def _ipv4_text(value: int) -> str:
    return inet.ntop4(value.to_bytes(4, "big"))


def _parse_ipv6(b: bytes, *, allow_scope: bool) -> tuple[bytes, str] | None:
    """Numeric IPv6 as glibc's getaddrinfo(AI_NUMERICHOST) takes it:
    inet_pton() text, optionally followed by ``%<decimal scope id>``.
    Returns (16 packed bytes, normalised text) or None."""
    scope: int | None = None
    if allow_scope and b"%" in b:
        b, _, sc = b.partition(b"%")
        # glibc also resolves interface names for link-local addresses;
        # that needs the host's interface table, so only numbers here.
        if not sc or not sc.isdigit():
            return None
        scope = _bounded_int(sc, 10, 0xFFFFFFFF)
        if scope > 0xFFFFFFFF:
            return None
    try:
        packed = inet.pton6(b.decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):
        return None
    text = inet.ntop6(packed)
    if scope is not None:
        text = f"{text}%{scope}"
    return packed, text


def _url_unquote(b: bytes) -> bytes | None:
    """rtpproxy's url_unquote(): %XX escapes and '+' for space."""
    out = bytearray()
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c == 0x25:  # '%'
            h = b[i + 1 : i + 3]
            if len(h) != 2 or h[0] not in _HEXDIGITS or h[1] not in _HEXDIGITS:
                return None
            out.append(int(h, 16))
            i += 3
            continue
        out.append(0x20 if c == 0x2B else c)
        i += 1
    return bytes(out)


# --------------------------------------------------------------------------
# splitting


def _split(data: bytes) -> tuple[list[bytes], list[list[bytes]]]:
    main: list[bytes] = []
    subs: list[list[bytes]] = []
    cur = main
    for tok in _SEPARATORS.split(data):
        if not tok:
            continue
        if b"\x00" in tok:
            raise _err(_E.PARSE_1)
        if tok == _AMPAMP:
            if len(subs) == MAX_SUBCOMMANDS:
                raise _err(_E.PARSE_1)
            cur = []
            subs.append(cur)
            continue
        cur.append(tok)
        if len(cur) > MAX_ARGS:
            raise _err(_E.PARSE_1)
    if not main or any(not s for s in subs):
        raise _err(_E.PARSE_1)
    return main, subs


# --------------------------------------------------------------------------
# the generic table: letter -> (name, min args, max args, modifiers?, subs?)

_TABLE: dict[int, tuple[str, int, int, bool, bool]] = {}
for _letter, _props in {
    "u": ("U", 5, 8, True, True),
    "l": ("L", 5, 6, True, True),
    "d": ("D", 3, 4, True, False),
    "p": ("P", 5, 6, True, False),
    "r": ("R", 3, 4, True, False),
    "c": ("C", 4, 5, True, False),
    "s": ("S", 3, 4, False, False),
    "n": ("N", 3, 4, True, False),
    "i": ("I", 1, 1, True, False),
    "q": ("Q", 3, 4 + QUERY_MAX_NAMES, True, True),
    "x": ("X", 1, 1, False, False),
    "g": ("G", 1, len(GLOBAL_COUNTERS) + 1, True, False),
}.items():
    _TABLE[ord(_letter)] = _props
    _TABLE[ord(_letter.upper())] = _props
_VF = ("VF", 2, 2, False, False)
_V = ("V", 1, 1, False, False)


def _pre_parse(args: list[bytes], subs: list[list[bytes]]) -> tuple[str, bytes]:
    word = args[0]
    first = word[0]
    mods = word[1:]
    if first in b"vV":
        if mods[:1] in (b"F", b"f"):
            props = _VF
            mods = mods[1:]
        else:
            props = _V
    else:
        found = _TABLE.get(first)
        if found is None:
            raise _err(_E.CMDUNKN)
        props = found
    name, min_argc, max_argc, has_mods, has_subc = props
    if not min_argc <= len(args) <= max_argc:
        raise _err(_E.PARSE_NARGS)
    if not has_mods and mods:
        raise _err(_E.PARSE_MODS)
    if not has_subc and subs:
        raise _err(_E.PARSE_SUBC)
    return name, mods


# --------------------------------------------------------------------------
# U / L


def _extract_addr(mods: bytes, start: int) -> tuple[bytes, int, int] | None:
    """rtpproxy's extractaddr(): digits and dots greedily (IPv4), or
    ``[hex digits and colons]`` (IPv6).  Returns (text, family, end)."""
    n = len(mods)
    if mods[start : start + 1] != b"[":
        j = start
        while j < n and (mods[j] in _DIGITS or mods[j] == 0x2E):
            j += 1
        if j == start:
            return None
        return mods[start:j], 4, j
    j = start + 1
    while j < n and (mods[j] in _HEXDIGITS or mods[j] == 0x3A):
        j += 1
    if j >= n or mods[j] != 0x5D:  # ']'
        return None
    if j == start + 1:
        return None
    return mods[start + 1 : j], 6, j + 1


def _numeric_host(text: bytes, family: int) -> str | None:
    """A literal taken by extractaddr() as getaddrinfo(AI_NUMERICHOST)
    accepts it, normalised; None if it does not parse."""
    if family == 4:
        v4 = _inet_aton_exact(text)
        return None if v4 is None else _ipv4_text(v4)
    v6 = _parse_ipv6(text, allow_scope=False)
    return None if v6 is None else v6[1]


def _strtoul(b: bytes) -> int | None:
    """glibc ``strtoul(b, &end, 10)`` when it consumes all of ``b``: leading
    C whitespace, one sign (a minus negates in unsigned arithmetic), digits;
    overflow clamps to ULONG_MAX.  None when something is left over."""
    n = len(b)
    j = 0
    while j < n and b[j] in _C_SPACE:
        j += 1
    neg = False
    if j < n and b[j] in b"+-":
        neg = b[j] == 0x2D
        j += 1
    if j == n or not b[j:].isdigit():
        return None
    value = _bounded_int(b[j:], 10, _ULONG_MAX)
    if value > _ULONG_MAX:
        return _ULONG_MAX
    return (-value) & _ULONG_MAX if neg else value


def _service_port(port: bytes, env: ParseEnv) -> int | None:
    """The remote port as getaddrinfo(3) resolves the service argument
    (glibc): a string strtoul() takes whole is a number, kept as a C
    ``int`` and then cut to 16 bits by htons() (``65536`` is port 0,
    ``+36000`` is 36000); a number that is negative as an ``int``, or any
    other string, is looked up as a UDP service name (``sip`` -> 5060)
    through ``env.service``.  None: getaddrinfo would fail (E37)."""
    num = _strtoul(port)
    if num is not None:
        as_int = _to_c_int(num)
        if as_int >= 0:
            return as_int & 0xFFFF
    if env.service is None:
        return None
    try:
        name = port.decode("ascii")
    except UnicodeDecodeError:
        return None
    got = env.service(name)
    return None if got is None else got & 0xFFFF


def _resolve_remote(
    addr: bytes, port: bytes, ipv6: bool, env: ParseEnv
) -> tuple[tuple[str, int] | None, bool]:
    """The U/L address/port: (remote, on_hold).  Raises E37."""
    n = len(addr)
    if ipv6:
        if not 2 <= n <= 45:
            return None, False
    elif not 7 <= n <= 15:
        return None, False
    port_num = _service_port(port, env)
    if port_num is None:
        raise _err(_E.INVLARG_7)
    if ipv6:
        v6 = _parse_ipv6(addr, allow_scope=True)
        if v6 is None:
            raise _err(_E.INVLARG_7)
        packed, text = v6
        if packed == bytes(16):
            return None, True
        return (text, port_num), False
    v4 = _inet_aton_exact(addr)
    if v4 is None:
        # getaddrinfo(AF_INET) also takes an IPv4-mapped IPv6 literal.
        v6 = _parse_ipv6(addr, allow_scope=True)
        if v6 is None or v6[0][:12] != _V4MAPPED_PREFIX:
            raise _err(_E.INVLARG_7)
        v4 = int.from_bytes(v6[0][12:], "big")
    if v4 == 0:
        return None, True
    return (_ipv4_text(v4), port_num), False


def _parse_ul_mods(mods: bytes, env: ParseEnv) -> ULMods:
    asymmetric: bool | None = None
    weak = False
    ipv6 = False
    ifaces: list[int] = []
    ptime: int | None = None
    codecs_text: bytes | None = None
    local_addr: str | None = None
    local_label: str | None = None
    remote_addr: str | None = None
    new_port = False

    n = len(mods)
    i = 0
    while i < n:
        c = mods[i]
        if c in b"aA":
            asymmetric = True
        elif c in b"eE":
            if len(ifaces) >= 2 or not env.bridge:
                raise _err(_E.PARSE_11)
            ifaces.append(1)
        elif c in b"iI":
            if len(ifaces) >= 2 or not env.bridge:
                raise _err(_E.PARSE_12)
            ifaces.append(0)
        elif c == 0x36:  # '6'
            ipv6 = True
        elif c in b"sS":
            asymmetric = False
        elif c in b"wW":
            weak = True
        elif c in b"zZ":
            value, end = _strtol(mods, i + 1)
            value = _to_c_int(value)
            if value <= 0 or value >= 1000:
                raise _err(_E.PARSE_13)
            ptime = value
            i = max(end, i + 1)
            continue
        elif c in b"cC":
            j = i + 1
            while j < n and (mods[j] in _DIGITS or mods[j] == 0x2C):
                j += 1
            if j == i + 1 or codecs_text is not None:
                raise _err(_E.PARSE_14)
            codecs_text = mods[i + 1 : j]
            i = j
            continue
        elif c in b"lL":
            if mods[i + 1 : i + 2] == b"{":
                close = mods.find(b"}", i + 2)
                if close <= i + 2:  # not found, or an empty label
                    raise _err(_E.PARSE_15)
                label = _s(mods[i + 2 : close])
                if label not in env.labels:
                    raise _err(_E.INVLARG_1)
                local_label = label
                local_addr = remote_addr = None
                i = close + 1
                continue
            got = _extract_addr(mods, i + 1)
            if got is None:
                raise _err(_E.PARSE_15)
            text, family, end = got
            norm = _numeric_host(text, family)
            if norm is None:
                raise _err(_E.INVLARG_1)
            local_addr = norm
            local_label = remote_addr = None
            i = end
            continue
        elif c in b"rR":
            got = _extract_addr(mods, i + 1)
            if got is None:
                raise _err(_E.PARSE_16)
            text, family, end = got
            norm = _numeric_host(text, family)
            if norm is None:
                raise _err(_E.INVLARG_2)
            remote_addr = norm
            local_addr = local_label = None
            i = end
            continue
        elif c in b"nN":
            new_port = True
        else:
            raise _err(_E.INVLARG_5)
        i += 1

    codecs: tuple[int, ...] | None = None
    if codecs_text is not None:
        codecs = tuple(_bounded_int(p, 10, 2**31 - 1) for p in codecs_text.split(b",") if p)
    return ULMods(
        asymmetric=asymmetric,
        weak=weak,
        ipv6=ipv6,
        ifaces=tuple(ifaces),
        ptime=ptime,
        codecs=codecs,
        codecs_text=None if codecs_text is None else _s(codecs_text),
        local_addr=local_addr,
        local_label=local_label,
        remote_addr=remote_addr,
        new_port=new_port,
    )


def _parse_ul_common(
    mods_b: bytes, addr: bytes, port: bytes, env: ParseEnv
) -> tuple[ULMods, tuple[str, int] | None, bool]:
    mods = _parse_ul_mods(mods_b, env)
    # No I/E and no L/R: the session goes on a bind address of the
    # family of the command's address, and there must be one.
    if not mods.ifaces and mods.local_addr is None and mods.local_label is None and mods.remote_addr is None:
        if not (env.has_ipv6 if mods.ipv6 else env.has_ipv4):
            raise _err(_E.INVLARG_6)
    remote, on_hold = _resolve_remote(addr, port, mods.ipv6, env)
    return mods, remote, on_hold


# --------------------------------------------------------------------------
# sub-commands


def _parse_sub(args: list[bytes], main: str, has_to_tag: bool, env: ParseEnv) -> SubCommand:
    word = args[0]
    kind = word[:1].lower()
    if kind == b"d":
        if len(args) != 1:
            raise _err(_E.PARSE_SUBC)
        if any(ch not in b"wW" for ch in word[1:]):
            raise _err(_E.PARSE_SUBC)
        return SubDelete(weak=len(word) > 1)
    if kind == b"s":
        if len(args) != 2 or len(word) > 2:
            raise _err(_E.PARSE_SUBC)
        reverse = word[1:2] in (b"r", b"R")
        val = args[1]
        if len(val) < 5:
            raise _err(_E.PARSE_SUBC)
        param = val[:4]
        if param not in (b"ttl=", b"tos="):
            raise _err(_E.PARSE_SUBC)
        num = _atoi_safe(val[4:])
        if num is None or num <= 0:
            raise _err(_E.PARSE_SUBC)
        if param == b"ttl=":
            return SubSet(reverse=reverse, ttl=num)
        return SubSet(reverse=reverse, tos=num)
    if kind == b"l":
        if main != "U" or not has_to_tag or len(args) != 3:
            raise _err(_E.PARSE_SUBC)
        try:
            _mods, remote, on_hold = _parse_ul_common(word[1:], args[1], args[2], env)
        except RtppError:
            raise _err(_E.PARSE_SUBC) from None
        return SubLookup(addr=_s(args[1]), port=_s(args[2]), remote=remote, on_hold=on_hold, mods=_mods)
    if kind == b"c":
        # "&& C call from to" (20260309): only after a U that has a to-tag,
        # the word exactly one letter, three non-empty arguments
        if main != "U" or not has_to_tag or len(args) != 4 or len(word) != 1:
            raise _err(_E.PARSE_SUBC)
        return SubCopy(call_id=_s(args[1]), from_tag=_s(args[2]), to_tag=_s(args[3]))
    # "&& M<mod>:<inst>" (modules) is not provided; anything else is not a
    # sub-command.
    raise _err(_E.PARSE_SUBC)


def _parse_subs(
    subs: list[list[bytes]], main: str, has_to_tag: bool, env: ParseEnv
) -> tuple[SubCommand, ...]:
    return tuple(_parse_sub(s, main, has_to_tag, env) for s in subs)


# --------------------------------------------------------------------------
# per-command parsers


def _parse_update(
    name: str, mods_b: bytes, args: list[bytes], subs: list[list[bytes]], env: ParseEnv
) -> Update:
    lookup = name == "L"
    argc = len(args)
    to_tag: bytes | None = None
    notify_socket: bytes | None = None
    notify_tag_raw: bytes | None = None
    if argc in (6, 8):
        to_tag = args[5]
    if not lookup and argc == 7:
        notify_socket, notify_tag_raw = args[5], args[6]
    elif not lookup and argc == 8:
        notify_socket, notify_tag_raw = args[6], args[7]

    notify_tag: bytes | None = None
    if notify_tag_raw is not None:
        notify_tag = _url_unquote(notify_tag_raw)
        if notify_tag is None:
            raise _err(_E.PARSE_10)

    mods, remote, on_hold = _parse_ul_common(mods_b, args[2], args[3], env)
    subcommands = _parse_subs(subs, name, to_tag is not None, env)
    if notify_socket is not None and not env.notify:
        raise _err(_E.NSOFF)
    return Update(
        lookup=lookup,
        call_id=_s(args[1]),
        addr=_s(args[2]),
        port=_s(args[3]),
        from_tag=_s(args[4]),
        to_tag=None if to_tag is None else _s(to_tag),
        mods=mods,
        remote=remote,
        on_hold=on_hold,
        notify_socket=None if notify_socket is None else _s(notify_socket),
        notify_tag=None if notify_tag is None else _s(notify_tag),
        subcommands=subcommands,
    )


def _opt(args: list[bytes], idx: int) -> str | None:
    return _s(args[idx]) if len(args) > idx else None


def _parse_query(mods_b: bytes, args: list[bytes], subs: list[list[bytes]], env: ParseEnv) -> Query:
    subcommands = _parse_subs(subs, "Q", len(args) > 3, env)
    # rtpproxy checks these once the session is found (E50 first), so the
    # code travels with the command and the dispatcher raises it after the
    # lookup.
    deferred = None
    for ch in mods_b:
        if ch not in b"vV":
            deferred = int(_E.PARSE_8)
            break
    names = tuple(_s(a) for a in args[4:])
    if deferred is None:
        for nm in names:
            if nm not in QUERY_COUNTERS:
                deferred = int(_E.QRYFAIL)
                break
    return Query(
        deferred_error=deferred,
        call_id=_s(args[1]),
        from_tag=_s(args[2]),
        to_tag=_opt(args, 3),
        verbose=bool(mods_b),
        names=names,
        subcommands=subcommands,
    )


def _parse_record(name: str, mods_b: bytes) -> tuple[bool, bool]:
    single = reply_port = False
    for ch in mods_b:
        if ch in b"sS":
            single = True
        elif ch in b"pP":
            if name == "R":
                raise _err(_E.PARSE_2)
            reply_port = True
        else:
            raise _err(_E.PARSE_3)
    return single, reply_port


def parse_command(data: bytes, env: ParseEnv) -> Command:
    """Parse one control command (no cookie).  Raises ``RtppError``."""
    args, subs = _split(bytes(data))
    name, mods = _pre_parse(args, subs)

    if name == "V":
        return Version()
    if name == "VF":
        return VersionFeature(datecode=_s(args[1]))
    if name == "X":
        return DeleteAll()
    if name == "I":
        brief = load = False
        for ch in mods:
            if ch in b"bB":
                brief = True
            elif ch in b"lL":
                load = True
            else:
                raise _err(_E.PARSE_7)
        return Info(brief=brief, load=load)
    if name == "G":
        for ch in mods:
            if ch not in b"vV":
                raise _err(_E.PARSE_5)
        names = tuple(_s(a) for a in args[1:])
        for nm in names:
            if nm not in GLOBAL_COUNTERS:
                raise _err(_E.STSFAIL)
        return Stats(verbose=bool(mods), names=names)
    if name in ("U", "L"):
        return _parse_update(name, mods, args, subs, env)
    if name == "Q":
        return _parse_query(mods, args, subs, env)
    if name == "D":
        for ch in mods:
            if ch not in b"wW":
                raise _err(_E.PARSE_4)
        return Delete(
            call_id=_s(args[1]),
            from_tag=_s(args[2]),
            to_tag=_opt(args, 3),
            weak=bool(mods),
        )
    if name == "R":
        single, _ = _parse_record(name, mods)
        return Record(
            call_id=_s(args[1]),
            from_tag=_s(args[2]),
            to_tag=_opt(args, 3),
            single=single,
        )
    if name == "C":
        single, reply_port = _parse_record(name, mods)
        return Copy(
            call_id=_s(args[1]),
            target=_s(args[2]),
            from_tag=_s(args[3]),
            to_tag=_opt(args, 4),
            single=single,
            reply_port=reply_port,
        )
    if name == "N":
        if mods[:1] in (b"a", b"A"):
            if len(mods) > 1:
                raise _err(_E.PARSE_2)
            all_ = True
        elif mods:
            raise _err(_E.PARSE_3)
        else:
            all_ = False
        return NoRecord(
            call_id=_s(args[1]),
            from_tag=_s(args[2]),
            to_tag=_opt(args, 3),
            all=all_,
        )
    if name == "P":
        count = 1
        if mods:
            value, end = _strtol(mods, 0)
            if end == 0 or end != len(mods):
                raise _err(_E.PARSE_6)
            count = _to_c_int(value)
        return Play(
            call_id=_s(args[1]),
            prompt=_s(args[2]),
            codecs=_s(args[3]),
            from_tag=_s(args[4]),
            to_tag=_opt(args, 5),
            count=count,
        )
    if name == "S":
        return StopPlay(call_id=_s(args[1]), from_tag=_s(args[2]), to_tag=_opt(args, 3))
    raise AssertionError(name)  # pragma: no cover - the table is closed
