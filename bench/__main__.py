"""python -m bench: run relays side by side under the same RTP load.

See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .harness import Options, run
from .relays import RelaySpec


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return vals


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cpu(text: str) -> int | None:
    if text.lower() in ("none", "no", "-"):
        return None
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark rtpproxy-compatible relays side by side: calls carried without loss, "
        "latency, CPU per packet, RSS, control-plane command rate.",
    )
    p.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="SPEC",
        help="pyrtpproxy | PATH | LABEL=PATH (repeat; a PATH whose name contains 'rtpengine' "
        "is run as rtpengine with --listen-udp). Default: pyrtpproxy",
    )
    p.add_argument(
        "--relay-args",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="extra command-line arguments for one relay (shell-quoted)",
    )
    p.add_argument(
        "--steps",
        type=_ints,
        default=[100, 200, 400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2400],
        help="session counts N to try, in order (default %(default)s)",
    )
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per step (default 12)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of media first (default 2)")
    p.add_argument("--max-loss", type=float, default=0.1, help="loss limit in percent (default 0.1)")
    p.add_argument(
        "--late-ms",
        type=float,
        default=50.0,
        help="a packet delayed more than this counts as lost, as a jitter buffer would drop it; "
        "0 to count only real loss (default 50, at most 200)",
    )
    p.add_argument(
        "--retries", type=int, default=1, help="re-runs of a failing step before giving up (default 1)"
    )
    p.add_argument(
        "--ctl-clients", type=int, default=4, help="parallel control clients for set-up (default 4)"
    )
    p.add_argument(
        "--control-sessions",
        type=int,
        default=1000,
        help="sessions for the control-plane phase, 0 to skip it (default 1000)",
    )
    p.add_argument(
        "--control-clients",
        type=_ints,
        default=[1, 4],
        help="client counts for the control-plane phase (default 1,4)",
    )
    p.add_argument(
        "--scenarios",
        type=_names,
        default=["control", "cmdrate", "media", "flood"],
        help="which parts to run, comma-separated, of control (U/L/D with 1 and 4 threaded clients), "
        "cmdrate (U/L/Q/D with --cmd-inflight in flight over udp, unix, tcp), media (calls per core), "
        "flood (a stranger sprays every port while calls run) (default: all)",
    )
    p.add_argument(
        "--cmd-sessions", type=int, default=2000, help="sessions per transport in cmdrate (default 2000)"
    )
    p.add_argument("--cmd-inflight", type=int, default=8, help="commands in flight in cmdrate (default 8)")
    p.add_argument(
        "--cmd-transports",
        type=_names,
        default=["udp", "unix", "tcp"],
        help="control transports for cmdrate (default udp,unix,tcp; rtpengine: udp only)",
    )
    p.add_argument(
        "--flood-calls", type=_ints, default=[150], help="calls running during the flood (default 150)"
    )
    p.add_argument(
        "--flood-pps",
        type=float,
        default=20000.0,
        help="the stranger's packets per second over the whole port range (default 20000)",
    )
    p.add_argument(
        "--relay-cpu", type=_cpu, default=0, help="CPU the relay is pinned to, or none (default 0)"
    )
    p.add_argument(
        "--gen-cpu",
        type=_cpu,
        default=1,
        help="CPU for the generator(s) and the harness, or none (default 1)",
    )
    p.add_argument(
        "--no-pin", action="store_true", help="pin nothing (same as --relay-cpu none --gen-cpu none)"
    )
    p.add_argument("--gen-procs", type=int, default=1, help="generator processes (default 1)")
    p.add_argument(
        "--gen-socks", type=int, default=8, help="endpoint sockets per side per generator (default 8)"
    )
    p.add_argument(
        "--generator",
        choices=["auto", "c", "python"],
        default="auto",
        help="C generator compiled at run time, or the Python fallback (default auto)",
    )
    p.add_argument("--port-min", type=int, default=10000, help="relays' media port range (default 10000)")
    p.add_argument(
        "--port-max", type=int, default=32000, help="(default 32000, below Linux's ephemeral ports)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="directory for bench.json and bench.png"
    )
    p.add_argument(
        "--results-md", type=Path, default=None, help="also write this Markdown report (bench/RESULTS.md)"
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only re-render the tables, plot and Markdown from an earlier bench.json",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="run the relay in its own network namespace behind a veth pair, so its core pays "
        "its kernel work too (root; needed to measure --kernel, e.g. "
        "--relay pyk=pyrtpproxy --relay-args pyk=--kernel)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cmdline = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.from_json is not None:
        from . import report

        res = json.loads(args.from_json.read_text())
        opts = Options(relays=[], steps=[], out=args.out, results_md=args.results_md, quiet=args.quiet)
        report.write_all(res, opts)
        return 0
    extra: dict[str, tuple[str, ...]] = {}
    for item in args.relay_args:
        label, sep, rest = item.partition("=")
        if not sep:
            parser().error(f"--relay-args {item!r}: expected LABEL=ARGS")
        extra[label] = tuple(shlex.split(rest))
    specs = []
    for text in args.relay or ["pyrtpproxy"]:
        try:
            spec = RelaySpec.parse(text)
        except ValueError as exc:
            parser().error(str(exc))
        specs.append(RelaySpec(spec.label, spec.kind, spec.path, extra.get(spec.label, ())))
    if len({s.label for s in specs}) != len(specs):
        parser().error("two relays have the same label: use LABEL=PATH")
    if args.late_ms > 200:
        parser().error("--late-ms: at most 200 (the generator's latency histogram ends there)")
    relay_cpu, gen_cpu = (None, None) if args.no_pin else (args.relay_cpu, args.gen_cpu)
    usable = os.sched_getaffinity(0)
    for cpu in (relay_cpu, gen_cpu):
        if cpu is not None and cpu not in usable:
            parser().error(f"CPU {cpu} is not usable here (usable: {sorted(usable)}); use --no-pin")
    bad = set(args.scenarios) - {"control", "cmdrate", "media", "flood"}
    if bad:
        parser().error(f"--scenarios: unknown {sorted(bad)}")
    bad = set(args.cmd_transports) - {"udp", "unix", "tcp"}
    if bad:
        parser().error(f"--cmd-transports: unknown {sorted(bad)}")
    if args.port_max - args.port_min < 4 * max(args.steps + args.flood_calls) + 100:
        parser().error("the media port range is too small for the largest step (4 ports per session)")
    opts = Options(
        relays=specs,
        steps=args.steps,
        duration=args.duration,
        warmup=args.warmup,
        max_loss=args.max_loss,
        late_ms=args.late_ms if args.late_ms > 0 else None,
        retries=args.retries,
        ctl_clients=args.ctl_clients,
        control_sessions=args.control_sessions,
        control_clients=tuple(args.control_clients),
        scenarios=tuple(args.scenarios),
        cmd_sessions=args.cmd_sessions,
        cmd_inflight=args.cmd_inflight,
        cmd_transports=tuple(args.cmd_transports),
        flood_calls=tuple(args.flood_calls),
        flood_pps=args.flood_pps,
        relay_cpu=relay_cpu,
        gen_cpu=gen_cpu,
        gen_procs=args.gen_procs,
        gen_socks=args.gen_socks,
        generator=args.generator,
        port_min=args.port_min,
        port_max=args.port_max,
        out=args.out,
        results_md=args.results_md,
        command_line=cmdline,
        quiet=args.quiet,
        netns=args.netns,
    )
    run(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
