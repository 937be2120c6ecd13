"""Tables, JSON, the plot and RESULTS.md, all from the one result dict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .harness import Options


def _f(v, fmt: str = "{:.2f}", none: str = "-") -> str:
    if isinstance(v, str):  # e.g. ">200": a latency beyond the histogram
        return v
    return none if v is None else fmt.format(v)


def _late(row: dict) -> float:
    return row.get("eff_loss_pct", row.get("loss_pct")) or 0.0


def step_line(row: dict) -> str:
    if "error" in row:
        return f"  {row['relay']:12s} N={row['n']:5d}  ERROR {row['error']}"
    flag = "ok" if row["ok"] else "FAIL"
    return (
        f"  {row['relay']:12s} N={row['n']:5d}  loss {row['loss_pct']:8.4f} %  late {_f(row.get('late_pct'), '{:.4f}')} %  "
        f"lat p50/p90/p99 {_f(row['lat_p50_ms'])}/{_f(row['lat_p90_ms'])}/{_f(row['lat_p99_ms'])} ms  "
        f"CPU {row['relay_cpu_pct']:5.1f} %  {_f(row['us_per_pkt'])} us/pkt  RSS {row['rss_mb']:.0f} MB  "
        f"gen CPU {row['gen_cpu_pct']:.0f} %  [{flag}]"
    )


STEP_COLS = [
    ("relay", "relay", "{}"),
    ("N", "n", "{}"),
    ("loss %", "loss_pct", "{:.4f}"),
    ("late %", "late_pct", "{:.4f}"),
    ("lat p50 ms", "lat_p50_ms", "{:.2f}"),
    ("p90", "lat_p90_ms", "{:.2f}"),
    ("p99", "lat_p99_ms", "{:.2f}"),
    ("relay CPU %", "relay_cpu_pct", "{:.1f}"),
    ("µs CPU/pkt", "us_per_pkt", "{:.2f}"),
    ("core CPU %", "core_cpu_pct", "{:.1f}"),
    ("core µs/pkt", "core_us_per_pkt", "{:.2f}"),
    ("RSS MB", "rss_mb", "{:.0f}"),
    ("kernel drops", "relay_rx_drops", "{}"),
    ("U/s", None, None),
    ("L/s", None, None),
    ("D/s", None, None),
    ("gen CPU %", "gen_cpu_pct", "{:.0f}"),
    ("", "ok", None),
]


def _cell(row: dict, title: str, key, fmt) -> str:
    if title in ("U/s", "L/s"):
        v = row.get("setup", {}).get(title[0], {}).get("rate_per_s")
        return _f(v, "{:.0f}")
    if title == "D/s":
        return _f(row.get("teardown", {}).get("D", {}).get("rate_per_s"), "{:.0f}")
    if key == "ok":
        if "error" in row:
            return "error"
        return "pass" if row["ok"] else "**fail**"
    v = row.get(key)
    return _f(v, fmt) if v is not None else "-"


def steps_table(res: dict) -> list[list[str]]:
    rows = [[t for t, _, _ in STEP_COLS]]
    for r in res["steps"]:
        rows.append([_cell(r, t, k, f) for t, k, f in STEP_COLS])
    return rows


def control_table(res: dict) -> list[list[str]]:
    rows = [
        [
            "relay",
            "clients",
            "U/s",
            "U p50/p99 ms",
            "L/s",
            "L p50/p99 ms",
            "D/s",
            "D p50/p99 ms",
            "µs CPU/cmd",
            "RSS MB (N sessions)",
        ]
    ]
    for label, by in res["control"].items():
        if "error" in by:
            rows.append([label, "-", "error: " + by["error"]] + [""] * 7)
            continue
        for clients, row in by.items():
            cells = [label, clients]
            for c in ("U", "L", "D"):
                p = row[c]
                cells += [f"{p['rate_per_s']:.0f}", f"{p['lat_p50_ms']:.2f}/{p['lat_p99_ms']:.2f}"]
            cells += [f"{row['all']['relay_cpu_us_per_cmd']}", f"{row['all']['rss_mb_at_n']}"]
            rows.append(cells)
    return rows


def cmdrate_table(res: dict) -> list[list[str]]:
    rows = [
        [
            "relay",
            "transport",
            "U/s",
            "L/s",
            "Q/s",
            "D/s",
            "all/s",
            "p50 ms",
            "p99 ms",
            "µs CPU/cmd",
            "U µs CPU",
            "L µs CPU",
            "Q µs CPU",
            "D µs CPU",
            "errors/timeouts",
        ]
    ]
    for label, by in res.get("cmdrate", {}).items():
        if "error" in by:
            rows.append([label, "-", "error: " + by["error"]] + [""] * 12)
            continue
        for transport, row in by.items():
            if "n/a" in row:
                rows.append([label, transport, "n/a"] + [""] * 12)
                continue
            a = row["all"]
            rows.append(
                [label, transport]
                + [_f(row[k]["rate_per_s"], "{:.0f}") for k in "ULQD"]
                + [
                    _f(a["rate_per_s"], "{:.0f}"),
                    _f(a["lat_p50_ms"], "{:.2f}"),
                    _f(a["lat_p99_ms"], "{:.2f}"),
                    _f(a["relay_cpu_us_per_cmd"], "{:.0f}"),
                ]
                + [_f(row[k]["relay_cpu_us_per_cmd"], "{:.0f}") for k in "ULQD"]
                + [f"{a['errors']}/{a['timeouts']}"]
            )
    return rows


FLOOD_COLS = [
    ("relay", "relay", "{}"),
    ("calls", "n", "{}"),
    ("stranger pkt/s", "flood_pps", "{:.0f}"),
    ("stranger sent", "flood_sent", "{}"),
    ("calls' loss %", "loss_pct", "{:.4f}"),
    ("late %", "late_pct", "{:.4f}"),
    ("lat p50 ms", "lat_p50_ms", "{:.2f}"),
    ("p99", "lat_p99_ms", "{:.2f}"),
    ("relay CPU %", "relay_cpu_pct", "{:.1f}"),
    ("lossy calls", "lossy_sessions", "{}"),
]


def flood_table(res: dict) -> list[list[str]]:
    rows = [[t for t, _, _ in FLOOD_COLS]]
    for r in res.get("flood", []):
        if "error" in r:
            rows.append([r["relay"], str(r["n"]), "error: " + r["error"]] + [""] * (len(FLOOD_COLS) - 3))
            continue
        rows.append([_f(r.get(k), f) for _, k, f in FLOOD_COLS])
    return rows


def max_table(res: dict) -> list[list[str]]:
    p = res["meta"]["params"]
    crit = "max N at ≤ %.2g %% loss" % p["max_loss_pct"]
    if p.get("late_ms") is not None:
        crit += " (late > %g ms = lost)" % p["late_ms"]
    rows = [
        [
            "relay",
            "version",
            crit,
            "µs CPU/pkt at that N",
            "relay CPU % at that N",
            "core µs/pkt at that N",
            "first failing N",
        ]
    ]
    for label, n in res["max_n"].items():
        at = [r for r in res["steps"] if r["relay"] == label and r["n"] == n and r.get("ok")]
        fail = [r for r in res["steps"] if r["relay"] == label and not r.get("ok")]
        last = fail[-1] if fail else None
        fail_txt = "not reached"
        if last is not None:
            if "error" in last:
                fail_txt = f"{last['n']} (error)"
            else:
                fail_txt = f"{last['n']} ({_late(last):.2f} % lost or late; {last['loss_pct']:.2f} % lost)"
        rows.append(
            [
                label,
                res["meta"]["relays"][label]["version"],
                str(n) if n else "< first step",
                _f(at[-1]["us_per_pkt"] if at else None),
                _f(at[-1]["relay_cpu_pct"] if at else None, "{:.0f}"),
                _f(at[-1].get("core_us_per_pkt") if at else None),
                fail_txt,
            ]
        )
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def write_json(res: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def plot(res: dict, path: Path) -> bool:
    """Loss, relay CPU and CPU per packet against N. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    floor = 1e-4
    for label in res["max_n"]:
        rows = [r for r in res["steps"] if r["relay"] == label and "error" not in r]
        # The last attempt of each N.
        by_n = {r["n"]: r for r in rows}
        ns = sorted(by_n)
        if not ns:
            continue
        axes[0].plot(ns, [max(_late(by_n[n]), floor) for n in ns], "o-", label=label)
        axes[1].plot(ns, [by_n[n]["relay_cpu_pct"] for n in ns], "o-", label=label)
        axes[2].plot(ns, [by_n[n]["us_per_pkt"] or 0 for n in ns], "o-", label=label)
    axes[0].axhline(res["meta"]["params"]["max_loss_pct"], color="grey", ls="--", lw=1)
    axes[0].set_yscale("log")
    late = res["meta"]["params"].get("late_ms")
    axes[0].set_ylabel(
        f"lost{f' or > {late:g} ms late' if late is not None else ''} % (0 drawn at {floor:g})"
    )
    axes[1].set_ylabel("relay CPU % (one core)")
    axes[1].axhline(100, color="grey", ls="--", lw=1)
    axes[2].set_ylabel("µs of relay CPU per relayed packet")
    for ax in axes:
        ax.set_xlabel("sessions N (2 × 50 pkt/s each)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    m = res["meta"]["machine"]
    fig.suptitle(
        f"{res['meta']['date']}  {m['cpu_model']} ×{m['cpu_count']}  relay {res['meta']['pinning']['relay']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def results_md(res: dict, png_rel: str | None) -> str:
    meta = res["meta"]
    m = meta["machine"]
    g = meta["generator"]
    p = meta["params"]
    lines = [
        "# pyrtpproxy benchmark results",
        "",
        "Generated by `python -m bench` (bench/README.md explains the method); do not edit by hand,",
        "run the command below again instead.",
        "",
        f"* Date: {meta['date']} (finished {meta.get('finished', '?')})",
        f"* Machine: {m['cpu_model']}, {m['cpu_count']} cores (usable {m['cpus_usable']}), {m['mem_gb']} GB, "
        f"Linux {m['kernel']}, Python {m['python']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"* Pinning: relay `{meta['pinning']['relay']}`, generator `{meta['pinning']['generator']}`, "
        f"harness {meta['pinning']['harness']}",
        f"* Load: sessions of {g['streams_per_session']} streams × {g['pps_per_stream']} pkt/s of {g['packet_bytes']}-byte RTP "
        f"over loopback; generator: {g['kind']}, {g['processes']} process(es), {g['sockets_per_side']} sockets per side",
        f"* Each step: {p['warmup_s']} s warm-up, {p['duration_s']} s measured; a relay stops at the first step with "
        f"loss above {p['max_loss_pct']} % (after {p['retries']} re-run(s))"
        + (
            f", where a packet more than {p['late_ms']:g} ms late counts as lost (a jitter buffer would discard it)"
            if p.get("late_ms") is not None
            else ""
        )
        + f"; control set-up with {p['ctl_clients']} parallel clients",
        "",
        "Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        "Relays (the harness adds `taskset -c CPU` in front, and its own control port and media range):",
        "",
    ]
    for label, r in meta["relays"].items():
        lines.append(f"* **{label}** ({r['version']}): `{' '.join(r['argv'])}`")
    lines += [""]
    if res["steps"]:
        lines += ["## Calls per core", "", md_table(max_table(res)), ""]
    if png_rel and res["steps"]:
        lines += [f"![loss, CPU and CPU per packet against N]({png_rel})", ""]
    if res["steps"]:
        lines += [
            "## Every step",
            "",
            md_table(steps_table(res)),
            "",
        ]
    lines += [
        "Latency is from the generator's send call to the kernel's receive timestamp of the relayed packet "
        "(SO_TIMESTAMPNS), so it includes the loopback path, not the receiver's scheduling. "
        '"late %" is the share of packets that arrived but later than the late limit (counted as lost for pass/fail); '
        '"kernel drops" are receive-queue overflows on the relay\'s own sockets during the window. '
        "U/L/D per second here are at zero media load, while the step's sessions are set up and torn down.",
        "",
    ]
    if res["control"]:
        lines += [
            "## Control plane",
            "",
            f"{p['control_sessions']} sessions: all U (offer), then all L (answer), then all D, with 1 and with several "
            "parallel clients (one UDP socket each, Kamailio's cookie protocol); no media.",
            "",
            md_table(control_table(res)),
            "",
        ]
    if res.get("cmdrate"):
        lines += [
            "## Command rate",
            "",
            f"{p.get('cmd_sessions')} sessions per transport: all U (offer), all L (answer), all Q, all D, "
            f"{p.get('cmd_inflight')} commands in flight (one client thread, an epoll loop over "
            f"{p.get('cmd_inflight')} sockets: udp with cookies, tcp persistent lines, unix one connection "
            "per command); no media. µs CPU/cmd is the relay's user + system CPU over the phase "
            "divided by its commands; latency is from send to reply.",
            "",
            md_table(cmdrate_table(res)),
            "",
        ]
    if res.get("flood"):
        lines += [
            "## Flood",
            "",
            f"N calls run as in the media steps while a stranger sprays {p.get('flood_pps'):.0f} packets/s "
            "round-robin over every port of the relay's range (-m..-M, from 4 source ports); loss and "
            "late are the calls' own packets.",
            "",
            md_table(flood_table(res)),
            "",
        ]
    return "\n".join(lines)


def write_all(res: dict, opts: Options) -> None:
    out = opts.out
    write_json(res, out / "bench.json")
    png = out / "bench.png"
    have_png = plot(res, png)
    if True:  # the tables always go to stdout; progress (stderr) is what --quiet silences
        if res["steps"]:
            print()
            print(text_table(max_table(res)))
            print()
            print(text_table(steps_table(res)))
        if res["control"]:
            print()
            print(text_table(control_table(res)))
        if res.get("cmdrate"):
            print()
            print(text_table(cmdrate_table(res)))
        if res.get("flood"):
            print()
            print(text_table(flood_table(res)))
        print()
        print(
            f"JSON: {out / 'bench.json'}"
            + (f"   plot: {png}" if have_png else "   (no plot: matplotlib missing)")
        )
    if opts.results_md is not None:
        rel = os.path.relpath(png, opts.results_md.parent) if have_png else None
        opts.results_md.write_text(results_md(res, rel))
        print(f"Markdown: {opts.results_md}")
