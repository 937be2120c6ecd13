#!/usr/bin/env python3
"""Differential runner: the same control commands to rtpproxy and pyrtpproxy.

A *case* is a file ``cases/<name>.case``: control commands, one per line, run
by a server started as ``<server> -f -s stdio: <flags>`` with the lines on its
stdin; the server's whole stdout is the result.  Lines starting with ``%`` are
directives, ``#`` lines and blank lines are ignored:

* ``%flags <args...>``: the server's command line after ``-f -s stdio:``
  (shell words); ``{tmp}`` stands for a fresh temporary directory.  Use ``-b`` with fixed ``-m``/``-M`` so ports are
  deterministic; the runner shifts that port range at replay time (see below).
* ``X`` is appended to the commands when the case does not end with it:
  rtpproxy under ``stdio:`` exits at EOF only once no session is left.
* ``%normalize <regex> <replacement>``: applied to both outputs before they
  are compared (for values that vary between runs, e.g. timings).

``cases/<name>.out`` holds the expected output, recorded from the real
rtpproxy 3.2 (``record``).  The pytest (test_differential.py) replays every
case against pyrtpproxy and compares with the ``.out`` file, so CI needs no
rtpproxy.

Port ranges: a case records with its own ``-m``/``-M``.  At replay the range
is moved by an even offset to one whose ports bind right now, and reply
numbers inside the moved range are moved back before comparing, so parallel
test runs on one machine do not collide.  A case that still differs is run
again with another offset (a port another process took in between is the
usual cause) before it counts as a failure.

Usage::

  rtpdiff.py record  --ref /path/to/rtpproxy [case ...]   # (re)write .out files
  rtpdiff.py compare --ref /path/to/rtpproxy [--ours CMD] [case ...]
                                                # both servers, live, side by side
  rtpdiff.py check   [--ours CMD] [case ...]    # ours against the .out files

``--ours`` defaults to ``<python> -m pyrtpproxy``.  ``-d``/``--debug`` keeps
the servers' stderr.
"""

from __future__ import annotations

import argparse
import difflib
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
RUN_TIMEOUT = 60.0  # s per server run


class Case:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.stem
        self.flags: list[str] = []
        self.normalize: list[tuple[re.Pattern[str], str]] = []
        self.commands: list[str] = []
        for raw in path.read_text().splitlines():
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.startswith("%flags"):
                self.flags += shlex.split(line[len("%flags") :])
            elif line.startswith("%normalize"):
                rx, _, repl = line[len("%normalize") :].strip().partition(" ")
                self.normalize.append((re.compile(rx), repl))
            elif line.startswith("%"):
                raise ValueError(f"{path}: unknown directive {line!r}")
            else:
                self.commands.append(line)
        # rtpproxy under stdio: exits at EOF only once no session is left.
        if not self.commands or self.commands[-1].split()[:1] != ["X"]:
            self.commands.append("X")

    @property
    def expected_path(self) -> Path:
        return self.path.with_suffix(".out")

    def port_range(self) -> tuple[int, int] | None:
        lo = hi = None
        for i, a in enumerate(self.flags[:-1]):
            if a == "-m":
                lo = int(self.flags[i + 1])
            elif a == "-M":
                hi = int(self.flags[i + 1])
        if lo is None or hi is None:
            return None
        return lo, hi

    def shifted_flags(self, delta: int) -> list[str]:
        out = list(self.flags)
        for i, a in enumerate(out[:-1]):
            if a in ("-m", "-M"):
                out[i + 1] = str(int(out[i + 1]) + delta)
        return out

    def norm(self, text: str) -> str:
        for rx, repl in self.normalize:
            text = rx.sub(repl, text)
        return text


def load_cases(names: list[str] | None = None) -> list[Case]:
    paths = sorted(CASES.glob("*.case"))
    if names:
        wanted = {Path(n).stem for n in names}
        paths = [p for p in paths if p.stem in wanted]
    return [Case(p) for p in paths]


def run_server(cmd: list[str], flags: list[str], commands: list[str], *, debug: bool = False) -> str:
    stdin = "".join(c + "\n" for c in commands).encode("utf-8", "surrogateescape")
    with tempfile.TemporaryDirectory(prefix="rtpdiff-") as tmp:
        return _run(cmd, [f.replace("{tmp}", tmp) for f in flags], stdin, debug)


def _run(cmd: list[str], flags: list[str], stdin: bytes, debug: bool) -> str:
    proc = subprocess.run(
        [*cmd, "-F", "-f", "-s", "stdio:", *flags],
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=None if debug else subprocess.DEVNULL,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {' '.join(flags)}: exit status {proc.returncode}")
    return proc.stdout.decode("utf-8", "surrogateescape")


def _range_free(lo: int, hi: int) -> bool:
    """Every port lo..hi+1 binds on UDP (IPv4 and, if present, IPv6)."""
    fams = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        fams.append((socket.AF_INET6, "::"))
    for port in range(lo, hi + 2):
        for fam, host in fams:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
            except OSError as exc:
                if fam == socket.AF_INET6 and exc.errno == 99:  # no IPv6 here
                    continue
                return False
            finally:
                s.close()
    return True


def pick_delta(lo: int, hi: int, rng: random.Random) -> int:
    """An even offset that moves lo..hi+1 into 20000..59999 onto free ports."""
    span = hi - lo + 2
    for _ in range(200):
        base = rng.randrange(20000, 60000 - span) & ~1
        if _range_free(base, base + (hi - lo)):
            return base - lo
    return 0


def unshift(text: str, lo: int, hi: int, delta: int) -> str:
    """Move numbers inside the shifted range back by ``delta``."""
    if delta == 0:
        return text
    nlo, nhi = lo + delta, hi + delta + 1

    def sub(m: re.Match[str]) -> str:
        v = int(m.group())
        return str(v - delta) if nlo <= v <= nhi else m.group()

    return re.sub(r"(?<![\w.:=])\d{4,5}(?![\w.:])", sub, text)


def run_ours(
    case: Case, cmd: list[str], *, tries: int = 3, debug: bool = False, expected: str | None = None
) -> str:
    """Run ``case`` on a moved port range; retry on mismatch (see module doc)."""
    rng = random.Random()
    pr = case.port_range()
    out = ""
    for _ in range(max(1, tries)):
        if pr is None:
            out = run_server(cmd, case.flags, case.commands, debug=debug)
        else:
            lo, hi = pr
            delta = pick_delta(lo, hi, rng)
            out = unshift(
                run_server(cmd, case.shifted_flags(delta), case.commands, debug=debug), lo, hi, delta
            )
        if expected is None or case.norm(out) == case.norm(expected):
            break
    return out


def run_ref(ref: str, case: Case, *, debug: bool = False) -> str:
    """The real rtpproxy on ``case``; rtpproxy 3.2 now and then crashes at
    exit (SIGSEGV seen once in ~50 runs), so a failed run is repeated."""
    for attempt in range(3):
        try:
            return run_server([ref], case.flags, case.commands, debug=debug)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def default_ours() -> list[str]:
    return [sys.executable, "-m", "pyrtpproxy"]


def diff_text(case: Case, want: str, got: str, a: str, b: str) -> str:
    return "".join(
        difflib.unified_diff(case.norm(want).splitlines(True), case.norm(got).splitlines(True), a, b, n=2)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["record", "compare", "check"])
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--ref", help="the real rtpproxy binary (record/compare)")
    ap.add_argument("--ours", help="our server command (default: python -m pyrtpproxy)")
    ap.add_argument("-d", "--debug", action="store_true")
    args = ap.parse_intermixed_args(argv)
    ours = shlex.split(args.ours) if args.ours else default_ours()
    failed = 0
    for case in load_cases(args.cases):
        if args.mode == "record":
            if not args.ref:
                ap.error("record needs --ref")
            out = run_ref(args.ref, case, debug=args.debug)
            case.expected_path.write_text(out)
            print(f"recorded {case.name}: {len(out.splitlines())} lines")
            continue
        if args.mode == "compare":
            if not args.ref:
                ap.error("compare needs --ref")
            want = run_ref(args.ref, case, debug=args.debug)
            label = "rtpproxy"
        else:
            want = case.expected_path.read_text()
            label = case.expected_path.name
        got = run_ours(case, ours, debug=args.debug, expected=want)
        if case.norm(got) == case.norm(want):
            print(f"ok   {case.name}")
        else:
            failed += 1
            print(f"FAIL {case.name}")
            print(diff_text(case, want, got, label, "pyrtpproxy"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
