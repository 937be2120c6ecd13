"""Grammar-aware fuzzing of the control protocol: the parser, the dispatcher
and the UDP control transport of an in-process relay.

    python -m bench.fuzz --inputs 1000000 [--seed N] [--direct] [--quiet]

Each input is one control datagram made from the command grammar
(U/L/D/Q/G/I/V/VF/R/C/N/P/S/X with their modifiers, tags, addresses, ports,
notify arguments and ``&&`` sub-commands), often mutated (a byte flipped, a
token dropped, doubled or cut, a NUL or junk inserted), or pure junk: empty,
blank, binary, oversized (up to 64 KB).  The datagrams go, one at a time with
a unique cookie, to a real UDP control socket on 127.0.0.1 of a relay started
in this process (``--direct`` calls ``Dispatcher.handle`` instead, without the
transport).  For every input it checks:

* exactly one reply comes back (a reply carries the request's cookie, or is
  a bare ``E5`` for a datagram without a usable cookie; any other datagram,
  or none within 5 s, is a failure);
* the reply is in the reply grammar of the command's letter (``E<code>``
  with a code rtpproxy has, or the command's own success shape);
* no exception escaped: the dispatcher logs an "internal error" (and answers
  E5) when a command raises, and the media thread counts failed jobs; both
  count as crashes.

No media is sent and every address in the grammar is a loopback, unspecified
or malformed one: the relay never sends a packet off this host.

The library half (:class:`Grammar`, :func:`check_reply`, :func:`run_fuzz`)
is what ``tests/daemon/test_dispatch_fuzz.py`` runs for a bounded number of
inputs in ``make test``.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from pyrtpproxy.protocol.ecodes import ECode

# ---- the reply grammar ---------------------------------------------------------------------
_V4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_V6 = r"[0-9a-fA-F:]*:[0-9a-fA-F:.]*"
ADDR = rf"\d{{1,5}}(?: (?:{_V4}(?: 4)?|{_V6}(?: 6)?))?"
VAL = r"(?:[a-z_]+=)?-?\d+(?:\.\d+)?"
VALS = rf"{VAL}(?: {VAL})*"
SUB = rf"(?:{ADDR}|-1)"
_RE = {
    "E": re.compile(r"E(\d{1,3})"),
    "UL": re.compile(rf"{ADDR}(?: && {SUB})*"),
    "V": re.compile(r"20040107"),
    "VF": re.compile(r"[01]"),
    "ZERO": re.compile(r"0"),
    "REC": re.compile(rf"0|{ADDR}"),
    "G": re.compile(rf"(?:{VALS})?"),
    "Q": re.compile(rf"{VALS}(?: && {SUB})*"),
    "I": re.compile(
        r"sessions created: \d+\nactive sessions: -?\d+\nactive streams: \d+\n"
        r"packets received: \d+\npackets transmitted: \d+(?:\naverage load: [\d.]+)?"
    ),
}
ECODES = frozenset(int(e) for e in ECode)
_WS = b" \t\r\n"
_WS_SPLIT = re.compile(rb"[ \t\r\n]+")


def expected_kind(cmd: bytes) -> str | None:
    """The success shape for a command's text (None: only an E-code fits)."""
    toks = [t for t in _WS_SPLIT.split(cmd) if t]
    if not toks:
        return None
    word = toks[0]
    c = chr(word[0]).upper() if word[0] < 128 else ""
    if c == "V":
        return "VF" if word[1:2] in (b"f", b"F") else "V"
    return {
        "U": "UL",
        "L": "UL",
        "D": "ZERO",
        "X": "ZERO",
        "S": "ZERO",
        "N": "ZERO",
        "R": "REC",
        "C": "REC",
        "P": "REC",
        "G": "G",
        "Q": "Q",
        "I": "I",
    }.get(c)


def check_reply(cmd: bytes, reply: bytes) -> str | None:
    """None if ``reply`` (no cookie) is a well-formed answer to ``cmd``, else why not."""
    if not reply.endswith(b"\n"):
        return "reply does not end in a newline"
    text = reply[:-1].decode("utf-8", "surrogateescape")
    m = _RE["E"].fullmatch(text)
    if m is not None:
        return None if int(m.group(1)) in ECODES else f"unknown error code {text}"
    kind = expected_kind(cmd)
    if kind is None:
        return f"success reply {text!r} to a command that cannot succeed"
    if kind != "I" and "\n" in text:
        return f"multi-line reply {text!r}"
    if not _RE[kind].fullmatch(text):
        return f"reply {text!r} is not a {kind} reply"
    return None


def split_datagram(data: bytes) -> tuple[bytes | None, bytes]:
    """(cookie, command) as rtpproxy sees a UDP datagram: the cookie is the
    first token (None if there is none or it holds a NUL: the reply is a bare
    E5); a datagram of 8 KiB or more is answered as an empty command."""
    head = data[:8192].lstrip(_WS)
    m = re.search(rb"[ \t\r\n]", head)
    cookie, body = (head, b"") if m is None else (head[: m.start()], head[m.end() :].lstrip(_WS))
    if not cookie or b"\0" in cookie:
        return None, b""
    return cookie, (body if len(data) < 8192 else b"")


# ---- the command grammar ---------------------------------------------------------------------
class Picker:
    """Where the grammar's choices come from: ``random.Random`` here; the
    hypothesis test passes one drawing from ``st.data()`` so that failures shrink."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def junk(self, n: int) -> bytes:
        return self.rng.randbytes(n)


CALLS = [b"c1", b"c2", b"c3", b"c4", b"c5", b"call-%zz", "é".encode(), b"x" * 200]
TAGS = [b"f", b"t", b"f;1", b"t;1", b"f;2", b"t;2", b"fA", b"tB;1", b"f%20x", b";", b";999999"]
ADDRS = [
    b"127.0.0.1",
    b"127.0.0.2",
    b"0.0.0.0",
    b"::1",
    b"::",
    b"::ffff:127.0.0.1",
    b"fe80::1%lo",
    b"127.1",
    b"1.2.3",
    b"256.1.1.1",
    b"127.0.0.1.5",
    b"abc",
    b"[::1]",
    b"0x7f.1",
    b"-1",
]
PORTS = [b"30000", b"30002", b"0", b"1", b"65535", b"65536", b"-1", b"abc", b"099", b"1e3", b"9" * 30]
UMODS = [
    b"a", b"A", b"s", b"S", b"w", b"6", b"n", b"e", b"i", b"z20", b"z0", b"z999", b"z1000", b"z-5",
    b"c0,8,101", b"c", b"c,,", b"c99999999999", b"l127.0.0.1", b"l127.0.0.2", b"l[::1]", b"l{x}",
    b"l{}", b"l", b"l1.2.3.4", b"r127.0.0.1", b"r[::1]", b"r", b"r1.2", b"1", b"x", b"%", b"\xff",
]  # fmt: skip
GNAMES = [b"nsess_created", b"ncmds_rcvd", b"npkts_rcvd", b"total_duration", b"pps_in", b"bogus", b""]
QNAMES = [b"ttl", b"npkts_ina", b"rtpa_jmax", b"longest_ipi", b"bogus"]
NOTIFY = [b"udp:127.0.0.1:9", b"unix:/nonexistent", b"tcp:127.0.0.1:9", b"x", b"%zz"]
PROMPTS = [b"prompt", b"/etc/passwd", b"../x", b"-"]
CODECS = [b"0", b"0,8", b"session", b"x", b""]
JUNK_TOKENS = [b"\x00", b"&&", b"&", b"\t", b"\r\n", b"%", b"\xff\xfe", "é".encode(), b"x" * 9000]


@attrs.define
class Grammar:
    """Makes control commands (without cookie) from the protocol's grammar."""

    p: Any  # a Picker

    def mods(self, pool: Sequence[bytes], k: int = 4) -> bytes:
        return b"".join(self.p.choice(pool) for _ in range(self.p.int(0, k)))

    def tag(self) -> bytes:
        return self.p.choice(TAGS)

    def call(self) -> bytes:
        if self.p.chance(0.03):
            return self.p.junk(self.p.int(1, 12)).replace(b" ", b"_") or b"j"
        return self.p.choice(CALLS)

    def ul(self, letter: bytes) -> list[bytes]:
        args = [
            letter + self.mods(UMODS),
            self.call(),
            self.p.choice(ADDRS),
            self.p.choice(PORTS),
            self.tag(),
        ]
        shape = self.p.int(0, 9)
        if letter in b"lL" or shape < 5:
            if shape >= 2 or letter in b"lL":
                args.append(self.tag())
        elif shape < 7:
            args += [self.p.choice(NOTIFY), self.tag()]
        else:
            args += [self.tag(), self.p.choice(NOTIFY), self.tag()]
        for _ in range(self.p.int(0, 2) if self.p.chance(0.3) else 0):
            args += [b"&&", *self.sub()]
        return args

    def sub(self) -> list[bytes]:
        k = self.p.int(0, 3)
        if k == 0:
            return [self.p.choice([b"D", b"Dw", b"DW", b"Dx"])]
        if k == 1:
            return [
                self.p.choice([b"S", b"Sr", b"Srx"]),
                self.p.choice([b"ttl=5", b"tos=184", b"ttl=0", b"ttl"]),
            ]
        if k == 2:
            return [b"L" + self.mods(UMODS, 2), self.p.choice(ADDRS), self.p.choice(PORTS)]
        return [self.p.choice([b"C", b"M1:2", b"x"])]

    def command(self) -> bytes:
        kind = self.p.int(0, 19)
        if kind <= 6:
            args = self.ul(self.p.choice([b"U", b"u", b"L", b"l"]))
        elif kind == 7:
            args = [self.p.choice([b"D", b"Dw", b"d", b"Dx"]), self.call(), self.tag()]
            if self.p.chance(0.6):
                args.append(self.tag())
        elif kind == 8:
            args = [self.p.choice([b"Q", b"Qv", b"Qx"]), self.call(), self.tag()]
            if self.p.chance(0.6):
                args.append(self.tag())
                args += [self.p.choice(QNAMES) for _ in range(self.p.int(0, 3))]
            if self.p.chance(0.2):
                args += [b"&&", *self.sub()]
        elif kind == 9:
            args = [self.p.choice([b"G", b"Gv", b"Gx"])] + [
                self.p.choice(GNAMES) for _ in range(self.p.int(0, 4))
            ]
        elif kind == 10:
            args = [self.p.choice([b"I", b"Ib", b"Il", b"Ix"])]
        elif kind == 11:
            args = [self.p.choice([b"V", b"v", b"Vx"])]
        elif kind == 12:
            args = [
                self.p.choice([b"VF", b"vf"]),
                self.p.choice([b"20040107", b"20081224", b"20191015", b"1", b"x"]),
            ]
        elif kind == 13:
            args = [self.p.choice([b"R", b"Rs", b"Rp", b"N", b"Na", b"Nax"]), self.call(), self.tag()]
            if self.p.chance(0.5):
                args.append(self.tag())
        elif kind == 14:
            args = [
                self.p.choice([b"C", b"Cs", b"Cp"]),
                self.call(),
                self.p.choice(NOTIFY + [b"file"]),
                self.tag(),
            ]
        elif kind == 15:
            args = [self.p.choice([b"P", b"P-1", b"P3", b"Px"]), self.call(), self.p.choice(PROMPTS)]
            args += [self.p.choice(CODECS), self.tag()]
        elif kind == 16:
            args = [self.p.choice([b"S", b"s"]), self.call(), self.tag()]
        elif kind == 17:
            args = [b"X"] if self.p.chance(0.2) else [self.p.choice([b"Xx", b"Z", b"?", b"\x00U"])]
        else:
            args = [self.p.choice(JUNK_TOKENS) for _ in range(self.p.int(1, 6))]
        if self.p.chance(0.25):
            args = self.mutate_tokens(args)
        sep = self.p.choice([b" ", b" ", b" ", b"\t", b"  ", b"\r\n"])
        data = sep.join(args)
        if self.p.chance(0.1):
            data = self.mutate_bytes(data)
        return data

    def mutate_tokens(self, args: list[bytes]) -> list[bytes]:
        args = list(args)
        for _ in range(self.p.int(1, 3)):
            op = self.p.int(0, 4)
            i = self.p.int(0, len(args) - 1) if args else 0
            if op == 0 and args:
                del args[i]
            elif op == 1 and args:
                args.insert(i, args[i])
            elif op == 2:
                args.insert(i, self.p.choice(JUNK_TOKENS))
            elif op == 3 and args:
                args[i] = args[i][: self.p.int(0, len(args[i]))]
            else:
                args += [self.p.choice(TAGS)] * self.p.int(1, 25)
        return args

    def mutate_bytes(self, data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(self.p.int(1, 4)):
            i = self.p.int(0, len(b))
            op = self.p.int(0, 2)
            if op == 0 and b and i < len(b):
                b[i] = self.p.int(0, 255)
            elif op == 1:
                b[i:i] = self.p.junk(self.p.int(1, 8))
            else:
                del b[i : i + self.p.int(1, 4)]
        return bytes(b)

    def datagram(self, cookie: bytes) -> bytes:
        """A whole UDP control datagram: mostly cookie + command, sometimes junk."""
        k = self.p.int(0, 99)
        if k == 0:
            return b""
        if k == 1:
            return self.p.choice([b" ", b"\r\n", b"\t \n"])
        if k == 2:
            return cookie  # a cookie and no command
        if k == 3:
            return cookie + b" " + self.p.junk(self.p.choice([8191, 8192, 9000, 65000]))
        if k == 4:
            return self.p.junk(self.p.int(1, 300))  # binary junk, any cookie
        if k == 5:
            return b"\x00" + cookie + b" V"
        return cookie + self.p.choice([b" ", b"\t", b"  "]) + self.command()


# ---- the runner ------------------------------------------------------------------------------
@attrs.define
class FuzzResult:
    inputs: int = 0
    crashes: int = 0  # exceptions logged by the dispatcher or the media thread
    bad_replies: int = 0  # outside the reply grammar
    missing: int = 0  # no reply
    extra: int = 0  # a reply that belongs to no request (or a second one)
    wall: float = 0.0
    replies: Counter = attrs.Factory(Counter)
    failures: list = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.bad_replies or self.missing or self.extra)

    def fail(self, what: str, data: bytes, reply: Any = None) -> None:
        if len(self.failures) < 20:
            self.failures.append((what, data[:300], reply if reply is None else reply[:300]))

    def summary(self) -> str:
        top = ", ".join(f"{k}:{v}" for k, v in self.replies.most_common(12))
        return (
            f"inputs {self.inputs}, crashes {self.crashes}, replies outside the grammar {self.bad_replies}, "
            f"missing replies {self.missing}, extra replies {self.extra}, wall {self.wall:.1f} s\n"
            f"replies: {top}"
        )


class _CrashCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "internal error" in record.getMessage():
            self.records.append(record)


def _reply_key(reply: bytes) -> str:
    r = reply[:8]
    if r.startswith(b"E"):
        return r.split(b"\n")[0].decode("ascii", "replace")
    return "ok"


async def run_fuzz(
    n: int,
    *,
    seed: int = 0,
    direct: bool = False,
    port_min: int = 50000,
    port_max: int = 51998,
    progress: Callable[[FuzzResult], None] | None = None,
    progress_every: int = 50000,
    reply_timeout: float = 5.0,
) -> FuzzResult:
    """Fuzz an in-process relay with ``n`` inputs (Trio); returns what was seen."""
    import trio

    from pyrtpproxy.daemon import control
    from pyrtpproxy.daemon.app import Server
    from pyrtpproxy.daemon.dispatcher import Iface, Settings

    rng = random.Random(seed)
    g = Grammar(Picker(rng))
    res = FuzzResult()
    crash = _CrashCounter()
    lg = logging.getLogger("pyrtpproxy")
    lg.addHandler(crash)
    sett = Settings(
        ifaces=(Iface(socket.AF_INET, "127.0.0.1"), Iface(socket.AF_INET6, "::1")),
        port_min=port_min,
        port_max=port_max,
    )
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    addr = b.sockname
    server = Server(sett, [b])
    t0 = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            cli = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await cli.bind(("127.0.0.1", 0))
            for i in range(n):
                cookie = b"z%d" % i
                data = g.datagram(cookie)
                res.inputs += 1
                if direct:
                    body = split_datagram(data)[1]
                    reply = await server.dispatcher.handle(body)
                    why = check_reply(body, reply)
                    if why:
                        res.bad_replies += 1
                        res.fail(why, body, reply)
                    res.replies[_reply_key(reply)] += 1
                else:
                    await _one_datagram(cli, addr, data, res, reply_timeout)
                if i % 2000 == 1999:
                    # a controller's clean-up: keeps the table (and its ports) bounded
                    await server.dispatcher.handle(b"X")
                if progress is not None and i % progress_every == progress_every - 1:
                    res.crashes = len(crash.records) + server.engine.errors
                    res.wall = time.monotonic() - t0
                    progress(res)
            # the end: nothing stray is still on its way
            if not direct:
                await _one_datagram(cli, addr, b"zend V", res, reply_timeout)
            cli.close()
            nursery.cancel_scope.cancel()
    finally:
        lg.removeHandler(crash)
        server.close()
    res.crashes = len(crash.records) + server.engine.errors
    for r in crash.records[:5]:
        res.fail("crash: " + r.getMessage(), b"", None)
    res.wall = time.monotonic() - t0
    return res


async def _one_datagram(cli: Any, addr: Any, data: bytes, res: FuzzResult, timeout: float) -> None:
    import trio

    cookie, body = split_datagram(data)
    try:
        await cli.sendto(data, addr)
    except OSError as e:  # e.g. EMSGSIZE: not an input the relay can see
        res.inputs -= 1
        res.fail(f"not sent: {e}", data)
        return
    with trio.move_on_after(timeout) as cs:
        while True:
            reply = await cli.recv(70000)
            if cookie is None:
                got, rest = None, reply  # a bare reply: check_reply wants an E-code
            else:
                got, _, rest = reply.partition(b" ")
            if got != cookie:
                res.extra += 1
                res.fail("extra or misrouted reply", data, reply)
                continue
            why = check_reply(body, rest)
            if why:
                res.bad_replies += 1
                res.fail(why, data, reply)
            res.replies[_reply_key(rest)] += 1
            return
    if cs.cancelled_caught:
        res.missing += 1
        res.fail(f"no reply within {timeout} s", data)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--direct", action="store_true", help="call the dispatcher, not the UDP socket")
    ap.add_argument("--port-min", type=int, default=50000)
    ap.add_argument("--port-max", type=int, default=51998)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    import trio

    logging.getLogger("pyrtpproxy").setLevel(logging.ERROR)
    logging.getLogger("pyrtpproxy").propagate = False

    def progress(r: FuzzResult) -> None:
        if not a.quiet:
            print(f"... {r.summary().splitlines()[0]}", flush=True)

    res = trio.run(
        lambda: run_fuzz(
            a.inputs,
            seed=a.seed,
            direct=a.direct,
            port_min=a.port_min,
            port_max=a.port_max,
            progress=progress,
        )
    )
    print(f"fuzz (seed {a.seed}, {'dispatcher' if a.direct else 'udp control socket'}): {res.summary()}")
    for what, data, reply in res.failures:
        print(f"  FAIL {what}: input {data!r} reply {reply!r}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
