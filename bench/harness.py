"""The benchmark run: control-plane phases, then media steps of N sessions.

For every N in ``--steps``, each relay still in the race gets its turn (the
order rotates from one N to the next), on a freshly started process:

1. start the relay pinned to the relay CPU, wait for it to answer ``V``;
2. start the generator process(es) pinned to the other CPU; they bind the
   endpoint sockets and report their ports;
3. set up N sessions as Kamailio does: all the ``U`` (offer), then all the
   ``L`` (answer), ``--ctl-clients`` clients in parallel; rates and
   latencies are recorded;
4. both directions of every session carry 172-byte RTP at 50 packets/s for
   warm-up + ``--duration`` seconds; within the window the harness samples
   the relay's CPU time, RSS and the kernel's drops on the relay's sockets;
5. ``D`` every session (rate recorded), stop the relay.

A relay leaves the race after a step whose loss is above ``--max-loss``
(re-run once with ``--retries 1`` to rule out a one-off hiccup); its
maximum N is the largest N it carried within the limit.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import control
from .generator import Generators, GenParams, build
from .relays import NET, RelayProcess, RelaySpec, pin_prefix, udp_drops


@dataclass
class Options:
    relays: list[RelaySpec]
    steps: list[int]
    duration: float = 12.0
    warmup: float = 2.0
    max_loss: float = 0.1  # percent
    late_ms: float | None = 50.0  # later than this counts as lost (a jitter buffer drops it)
    retries: int = 1
    ctl_clients: int = 4
    control_sessions: int = 1000
    control_clients: tuple[int, ...] = (1, 4)
    relay_cpu: int | None = 0
    gen_cpu: int | None = 1
    gen_procs: int = 1
    gen_socks: int = 8
    generator: str = "auto"
    port_min: int = 10000
    port_max: int = 32000
    scenarios: tuple[str, ...] = ("control", "cmdrate", "media", "flood")
    cmd_sessions: int = 2000
    cmd_inflight: int = 8
    cmd_transports: tuple[str, ...] = ("udp", "unix", "tcp")
    flood_calls: tuple[int, ...] = (150,)
    flood_pps: float = 20000.0
    out: Path = Path("bench-out")
    results_md: Path | None = None
    command_line: str = ""
    quiet: bool = False
    netns: bool = False  # relay in its own namespace behind a veth pair (bench/netns.py)


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def machine_info(opts: Options) -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "mem_gb": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_at_start": list(os.getloadavg()),
        "hostname": platform.node(),
    }


def pct(hist: list[list[int]], bin_ns: int, p: float, total: int) -> float | None:
    """Percentile (ms) of a sparse histogram [[bin, count], ...].

    ``inf`` when it lies beyond the histogram's range (200 ms), None without data.
    """
    if total <= 0:
        return None
    want = p / 100 * total
    acc = 0
    for b, c in hist:
        acc += c
        if acc >= want:
            return (b + 0.5) * bin_ns / 1e6
    return float("inf")


HIST_RANGE_MS = 200.0  # loadgen's histogram: 20000 bins of 10 us


def merge_hist(results: list[dict]) -> list[list[int]]:
    h: dict[int, int] = {}
    for r in results:
        for b, c in r["hist"]:
            h[b] = h.get(b, 0) + c
    return sorted([b, c] for b, c in h.items())


# ---- control-plane benchmark -------------------------------------------------


def control_bench(opts: Options, spec: RelaySpec, workdir: Path) -> dict:
    """U, L and D for ``control_sessions`` sessions, with 1 and several clients."""
    out: dict = {}
    relay = RelayProcess.start(
        spec,
        ctl_port=free_udp_port(),
        port_min=opts.port_min,
        port_max=opts.port_max,
        cpu=opts.relay_cpu,
        log_path=workdir / f"{spec.label}-control.log",
    )
    try:
        n = opts.control_sessions
        for clients in opts.control_clients:
            ids = control.CallIds(uuid.uuid4().hex[:8])
            addr = (NET.relay_ip, relay.ctl_port)
            # Endpoint addresses that nobody listens on: no media in this phase.
            a_ports = [40000 + (i % 10000) * 2 for i in range(n)]
            b_ports = [50000 + (i % 5000) * 2 for i in range(n)]
            cpu0 = relay.cpu_seconds()
            phases = [
                control.run_phase("U", addr, control.offer_commands(ids, a_ports), clients),
                control.run_phase("L", addr, control.answer_commands(ids, b_ports), clients),
            ]
            rss = relay.rss()
            phases.append(control.run_phase("D", addr, control.delete_commands(ids, n), clients))
            cpu = relay.cpu_seconds() - cpu0
            row = {p.name: p.summary() for p in phases}
            total = sum(len(p.replies) for p in phases)
            row["all"] = {
                "cmds": total,
                "rate_per_s": round(total / sum(p.elapsed for p in phases), 1),
                "relay_cpu_us_per_cmd": round(cpu / total * 1e6, 1),
                "rss_mb_at_n": round(rss / 2**20, 1),
            }
            out[str(clients)] = row
            log(
                opts,
                f"  control {spec.label:12s} clients={clients}: "
                + "  ".join(
                    f"{p.name} {p.rate:7.0f}/s p99 {row[p.name]['lat_p99_ms']:.2f} ms" for p in phases
                )
                + f"  ({row['all']['relay_cpu_us_per_cmd']} us CPU/cmd)",
            )
    finally:
        relay.stop()
    return out


# ---- command rate: U, L, Q, D with a fixed number in flight, per transport ---------


def cmdrate_bench(opts: Options, spec: RelaySpec, workdir: Path) -> dict:
    """U, L, Q, D for ``cmd_sessions`` sessions, ``cmd_inflight`` in flight, on each
    transport the relay offers (rtpengine: udp only); relay CPU per command."""
    from . import cmdrate

    sockdir = Path(tempfile.mkdtemp(prefix="rtpc", dir="/tmp"))  # short: sun_path
    unix_path = str(sockdir / "ctl.sock")
    tcp_port = free_tcp_port()
    transports = [t for t in opts.cmd_transports if t == "udp" or spec.kind != "rtpengine"]
    extra: tuple[str, ...] = ()
    if "unix" in transports:
        extra += (f"unix:{unix_path}",)
    if "tcp" in transports:
        extra += (f"tcp:{NET.relay_ip}:{tcp_port}",)
    relay = RelayProcess.start(
        spec,
        ctl_port=free_udp_port(),
        port_min=opts.port_min,
        port_max=opts.port_max,
        cpu=opts.relay_cpu,
        log_path=workdir / f"{spec.label}-cmdrate.log",
        extra_ctl=extra,
    )
    out: dict = {}
    try:
        targets = {"udp": (NET.relay_ip, relay.ctl_port), "unix": unix_path, "tcp": (NET.relay_ip, tcp_port)}
        n = opts.cmd_sessions
        for transport in opts.cmd_transports:
            if transport not in transports:
                out[transport] = {"n/a": f"{spec.kind} has no {transport} rtpproxy control"}
                continue
            ids = control.CallIds(uuid.uuid4().hex[:8])
            a_ports = [40000 + (i % 10000) * 2 for i in range(n)]
            b_ports = [50000 + (i % 5000) * 2 for i in range(n)]
            query = [f"Q {ids.cid(i)} {ids.atag(i)};1 {ids.btag(i)};1" for i in range(n)]
            row: dict = {}
            total_cmds = 0
            total_cpu = 0.0
            lat_all: list[int] = []
            t_all = 0.0
            for name, cmds in (
                ("U", control.offer_commands(ids, a_ports)),
                ("L", control.answer_commands(ids, b_ports)),
                ("Q", query),
                ("D", control.delete_commands(ids, n)),
            ):
                cpu0 = relay.cpu_seconds()
                r = cmdrate.run_commands(transport, targets[transport], cmds, opts.cmd_inflight, name=name)
                cpu = relay.cpu_seconds() - cpu0
                summ = r.summary()
                summ["relay_cpu_us_per_cmd"] = round(cpu / max(1, len(cmds)) * 1e6, 1)
                row[name] = summ
                total_cmds += len(cmds)
                total_cpu += cpu
                lat_all.extend(r.latencies_ns)
                t_all += r.elapsed
            lat_all.sort()
            row["all"] = {
                "cmds": total_cmds,
                "rate_per_s": round(total_cmds / t_all, 1) if t_all > 0 else None,
                "relay_cpu_us_per_cmd": round(total_cpu / max(1, total_cmds) * 1e6, 1),
                "lat_p50_ms": round(control.percentile(lat_all, 50) / 1e6, 3) if lat_all else None,
                "lat_p99_ms": round(control.percentile(lat_all, 99) / 1e6, 3) if lat_all else None,
                "errors": sum(row[k]["errors"] for k in "ULQD"),
                "timeouts": sum(row[k]["timeouts"] for k in "ULQD"),
            }
            out[transport] = row
            log(
                opts,
                f"  cmdrate {spec.label:12s} {transport:4s} x{opts.cmd_inflight}: "
                + "  ".join(f"{k} {row[k]['rate_per_s']:7.0f}/s" for k in "ULQD")
                + f"  p50 {row['all']['lat_p50_ms']} p99 {row['all']['lat_p99_ms']} ms"
                + f"  {row['all']['relay_cpu_us_per_cmd']} us CPU/cmd",
            )
    finally:
        relay.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    return out


def free_tcp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Flooder:
    """``python -m bench.flood`` spraying the relay's whole port range, pinned like the generator."""

    def __init__(self, opts: Options, duration: float) -> None:
        argv = pin_prefix(opts.gen_cpu) + [
            sys.executable,
            "-m",
            "bench.flood",
            "--host",
            NET.relay_ip,
            "--ports",
            f"{opts.port_min}-{opts.port_max}",
            "--pps",
            str(opts.flood_pps),
            "--duration",
            str(duration),
        ]
        if NET.relay_prefix:  # --netns: the relay's address is on a veth the harness made
            argv.append("--netns")
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=root)

    def finish(self, timeout: float = 30.0) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
        words = out.split()
        try:
            return {"flood_sent": int(words[1]), "flood_errors": int(words[3])}
        except (IndexError, ValueError):
            return {"flood_sent": None, "flood_errors": None}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---- one media step ----------------------------------------------------------


def media_step(
    opts: Options, spec: RelaySpec, n: int, gen_cmd: list[str], workdir: Path, *, flood: bool = False
) -> dict:
    """One step of N calls; ``flood``: a stranger sprays the whole port range meanwhile."""
    params = GenParams(
        nsock=opts.gen_socks,
        warmup_ms=int(opts.warmup * 1000),
        duration_ms=int(opts.duration * 1000),
        bind_ip=NET.gen_ip,
        relay_ip=NET.relay_ip,
    )
    row: dict = {"relay": spec.label, "n": n}
    if flood:
        row["flood_pps"] = opts.flood_pps
    relay = RelayProcess.start(
        spec,
        ctl_port=free_udp_port(),
        port_min=opts.port_min,
        port_max=opts.port_max,
        cpu=opts.relay_cpu,
        log_path=workdir / f"{spec.label}-{'flood-' if flood else ''}{n}.log",
    )
    gens = None
    flooder = None
    try:
        gens = Generators(gen_cmd, params, opts.gen_procs, pin_prefix(opts.gen_cpu))
        eps = gens.endpoints(n)
        ids = control.CallIds(uuid.uuid4().hex[:8])
        addr = (NET.relay_ip, relay.ctl_port)
        u = control.run_phase("U", addr, control.offer_commands(ids, [e[2] for e in eps]), opts.ctl_clients)
        lph = control.run_phase(
            "L", addr, control.answer_commands(ids, [e[3] for e in eps]), opts.ctl_clients
        )
        row["setup"] = {"U": u.summary(), "L": lph.summary()}
        shards: list[list[tuple[int, int, int, int, int]]] = [[] for _ in gens.procs]
        failed = 0
        for i, (p, k, _pa, _pb) in enumerate(eps):
            port_b = control.reply_port(u.replies[i])  # B sends here, relayed to A
            port_a = control.reply_port(lph.replies[i])  # A sends here, relayed to B
            if port_a is None or port_b is None:
                failed += 1
                continue
            shards[p].append((len(shards[p]), k, k, port_a, port_b))
        row["setup_failed"] = failed
        if failed == n:
            raise RuntimeError(f"{spec.label}: no session could be set up (first reply {u.replies[0]!r})")
        if flood:  # from before the media starts until after the window
            flooder = Flooder(opts, opts.warmup + opts.duration + 1.0)
        gens.go(shards)
        gens.wait_start()
        dpid = relay.pid if opts.netns else None
        t0, cpu0, drops0 = (
            time.monotonic(),
            relay.cpu_seconds(),
            udp_drops(opts.port_min, opts.port_max, dpid),
        )
        core0 = _core(opts)
        gens.wait_end()
        t1, cpu1, drops1 = (
            time.monotonic(),
            relay.cpu_seconds(),
            udp_drops(opts.port_min, opts.port_max, dpid),
        )
        core1 = _core(opts)
        rss = relay.rss()
        results = gens.results(timeout=opts.warmup + opts.duration + 30)
        if flooder is not None:
            row.update(flooder.finish())
        d = control.run_phase("D", addr, control.delete_commands(ids, n), opts.ctl_clients)
        row["teardown"] = {"D": d.summary()}
        alive = relay.alive()
    finally:
        if flooder is not None:
            flooder.kill()
        if gens is not None:
            gens.kill()
        relay.stop()
    sent = sum(r["sent"] for r in results)
    recv = sum(r["recv"] for r in results)
    hist = merge_hist(results)
    hist_total = sum(c for _, c in hist) + sum(r["hist_over"] for r in results)
    # (hist_over: received, but later than the histogram's range)
    bin_ns = results[0]["hist_bin_ns"]
    hist_over = sum(r["hist_over"] for r in results)
    if opts.late_ms is None:
        late = 0
    else:
        late_bin = int(opts.late_ms * 1e6 // bin_ns)
        late = sum(c for b, c in hist if b >= late_bin) + hist_over
    wall = t1 - t0
    cpu = cpu1 - cpu0
    gen_cpu = sum(r["cpu_s"] for r in results) / max(r["wall_s"] for r in results)
    lossy_sessions = len({(i, lo[0]) for i, r in enumerate(results) for lo in r["lossy"]})
    row.update(
        {
            "sessions": n - failed,
            "sent": sent,
            "recv": recv,
            "loss_pct": round(100.0 * (sent - recv) / sent, 4) if sent else None,
            "late_pct": round(100.0 * late / sent, 4) if sent else None,
            "eff_loss_pct": round(100.0 * (sent - recv + late) / sent, 4) if sent else None,
            "lossy_sessions": lossy_sessions,
            "lat_p50_ms": pct(hist, bin_ns, 50, hist_total),
            "lat_p90_ms": pct(hist, bin_ns, 90, hist_total),
            "lat_p99_ms": pct(hist, bin_ns, 99, hist_total),
            "relay_cpu_pct": round(100.0 * cpu / wall, 1) if wall > 0 else None,
            "us_per_pkt": round(cpu / recv * 1e6, 2) if recv else None,
            "pps_relayed": round(recv / wall) if wall > 0 else None,
            "rss_mb": round(rss / 2**20, 1),
            "relay_rx_drops": (drops1 - drops0) if drops0 >= 0 and drops1 >= 0 else None,
            "relay_alive": alive,
            "gen_cpu_pct": round(100.0 * gen_cpu, 1),
            "gen_late_ticks": sum(r["late_ticks"] for r in results),
            "gen_max_late_ms": round(max(r["max_late_ns"] for r in results) / 1e6, 2),
            "gen_send_err": sum(r["send_err"] for r in results),
            "gen_rxq_ovfl": sum(r["rxq_ovfl"] for r in results),
            "window_s": round(wall, 3),
        }
    )
    if core0 is not None and core1 is not None:
        # The relay's whole core: with --netns it carries the relay's kernel work too
        # (the forwarding, for --kernel), and nothing else on a quiet machine.
        core = core1 - core0
        row["core_cpu_pct"] = round(100.0 * core / wall, 1) if wall > 0 else None
        row["core_us_per_pkt"] = round(core / recv * 1e6, 2) if recv else None
    for k in ("lat_p50_ms", "lat_p90_ms", "lat_p99_ms"):
        if row[k] is not None:
            # JSON has no infinity: a percentile beyond the histogram is written as its range, flagged.
            row[k] = round(row[k], 3) if row[k] != float("inf") else f">{HIST_RANGE_MS:g}"
    row["ok"] = bool(sent) and row["eff_loss_pct"] <= opts.max_loss and alive and failed == 0
    return row


def _core(opts: Options) -> float | None:
    if opts.relay_cpu is None:
        return None
    from .netns import core_busy_seconds

    try:
        return core_busy_seconds(opts.relay_cpu)
    except (OSError, ValueError):
        return None


# ---- the whole run -------------------------------------------------------------


def run(opts: Options) -> dict:

    opts.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(opts)  # before the harness pins itself
    net = None
    if opts.netns:
        from .netns import GEN_IP, RELAY_IP, BenchNet

        net = BenchNet(opts.relay_cpu, opts.gen_cpu)
        net.enter_gen()  # the harness and the generators: namespace G
        NET.relay_ip, NET.gen_ip, NET.relay_prefix = RELAY_IP, GEN_IP, tuple(net.relay_prefix())
    try:
        return _run(opts, machine)
    finally:
        if net is not None:
            net.close()


def _run(opts: Options, machine: dict) -> dict:
    from . import report

    if opts.gen_cpu is not None:
        # The harness (control clients, bookkeeping) stays off the relay's CPU.
        try:
            os.sched_setaffinity(0, {opts.gen_cpu})
        except OSError:
            pass
    workdir = Path(tempfile.mkdtemp(prefix="pyrtpproxy-bench-"))
    gen_cmd, gen_desc = build(opts.generator, workdir)
    started = datetime.now(UTC)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": opts.command_line,
        "machine": machine,
        "topology": (
            f"netns: relay {NET.relay_ip} and load {NET.gen_ip} in two namespaces joined by a veth pair, "
            "RPS of each end on its own CPU"
            if opts.netns
            else "loopback"
        ),
        "pinning": {
            "relay": f"taskset -c {opts.relay_cpu}" if opts.relay_cpu is not None else "none",
            "generator": f"taskset -c {opts.gen_cpu}" if opts.gen_cpu is not None else "none",
            "harness": f"sched_setaffinity {{{opts.gen_cpu}}}" if opts.gen_cpu is not None else "none",
        },
        "generator": {
            "kind": gen_desc,
            "processes": opts.gen_procs,
            "sockets_per_side": opts.gen_socks,
            "packet_bytes": 172,
            "pps_per_stream": 50,
            "streams_per_session": 2,
        },
        "params": {
            "steps": opts.steps,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "max_loss_pct": opts.max_loss,
            "late_ms": opts.late_ms,
            "retries": opts.retries,
            "ctl_clients": opts.ctl_clients,
            "control_sessions": opts.control_sessions,
            "control_clients": list(opts.control_clients),
            "scenarios": list(opts.scenarios),
            "cmd_sessions": opts.cmd_sessions,
            "cmd_inflight": opts.cmd_inflight,
            "cmd_transports": list(opts.cmd_transports),
            "flood_calls": list(opts.flood_calls),
            "flood_pps": opts.flood_pps,
            "port_range": [opts.port_min, opts.port_max],
        },
        "relays": {
            s.label: {
                "kind": s.kind,
                "version": s.version(),
                "argv": s.command("CTLPORT", opts.port_min, opts.port_max),
            }
            for s in opts.relays
        },
        "workdir": str(workdir),
    }
    res: dict = {"meta": meta, "control": {}, "steps": [], "max_n": {}}
    log(opts, f"bench: generator {gen_desc}; logs in {workdir}")

    if "control" in opts.scenarios and opts.control_sessions > 0:
        for spec in opts.relays:
            try:
                res["control"][spec.label] = control_bench(opts, spec, workdir)
            except Exception as exc:
                res["control"][spec.label] = {"error": str(exc)}
                log(opts, f"  control {spec.label}: FAILED {exc}")

    if "cmdrate" in opts.scenarios and opts.cmd_sessions > 0:
        res["cmdrate"] = {}
        for spec in opts.relays:
            try:
                res["cmdrate"][spec.label] = cmdrate_bench(opts, spec, workdir)
            except Exception as exc:
                res["cmdrate"][spec.label] = {"error": str(exc)}
                log(opts, f"  cmdrate {spec.label}: FAILED {exc}")
        report.write_json(res, opts.out / "bench.json")

    if "flood" in opts.scenarios:
        res["flood"] = []
        for fi, n in enumerate(opts.flood_calls):
            k = fi % len(opts.relays)
            for spec in opts.relays[k:] + opts.relays[:k]:
                try:
                    row = media_step(opts, spec, n, gen_cmd, workdir, flood=True)
                except Exception as exc:
                    row = {
                        "relay": spec.label,
                        "n": n,
                        "ok": False,
                        "error": str(exc),
                        "flood_pps": opts.flood_pps,
                    }
                res["flood"].append(row)
                log(opts, "  flood " + report.step_line(row) + f"  stranger sent {row.get('flood_sent')}")
        report.write_json(res, opts.out / "bench.json")

    active = list(opts.relays) if "media" in opts.scenarios else []
    best: dict[str, int] = {s.label: 0 for s in opts.relays}
    for si, n in enumerate(opts.steps):
        if not active:
            break
        order = active[si % len(active) :] + active[: si % len(active)]
        for spec in order:
            for attempt in range(opts.retries + 1):
                try:
                    row = media_step(opts, spec, n, gen_cmd, workdir)
                except Exception as exc:
                    row = {"relay": spec.label, "n": n, "ok": False, "error": str(exc)}
                row["attempt"] = attempt + 1
                res["steps"].append(row)
                log(opts, report.step_line(row))
                if row["ok"]:
                    break
            if row["ok"]:
                best[spec.label] = max(best[spec.label], n)
            else:
                active.remove(spec)
        # Save as we go: a long run that is interrupted still leaves its data.
        res["max_n"] = dict(best)
        report.write_json(res, opts.out / "bench.json")
    res["max_n"] = dict(best)
    res["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    res["meta"]["still_passing_at_last_step"] = [s.label for s in active]
    report.write_all(res, opts)
    return res


def quote_argv(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
