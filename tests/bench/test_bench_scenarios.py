"""Smoke test of the command-rate and flood scenarios: tiny load, pyrtpproxy only.

It checks that both scenarios run end to end and report what they measured;
it asserts no timing (benchmarks live in bench/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cmdrate_and_flood_scenarios_run(tmp_path):
    out = tmp_path / "out"
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenarios",
            "cmdrate,flood",
            "--cmd-sessions",
            "20",
            "--cmd-inflight",
            "4",
            "--flood-calls",
            "4",
            "--flood-pps",
            "500",
            "--duration",
            "1.5",
            "--warmup",
            "0.5",
            "--no-pin",
            "--out",
            str(out),
            "--results-md",
            str(md),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "bench.json").read_text())
    rate = data["cmdrate"]["pyrtpproxy"]
    assert set(rate) == {"udp", "unix", "tcp"}
    for transport, row in rate.items():
        for name in "ULQD":
            assert row[name]["cmds"] == 20, (transport, name)
            assert row[name]["timeouts"] == 0 and row[name]["lat_p50_ms"] is not None
        # every U/L/Q/D of the run found its session
        assert row["all"]["errors"] == 0, transport
        assert row["all"]["relay_cpu_us_per_cmd"] >= 0
    (flood,) = data["flood"]
    assert flood["relay"] == "pyrtpproxy" and flood["n"] == 4
    assert flood["sent"] > 0 and flood["recv"] > 0 and flood["relay_alive"]
    assert flood["flood_sent"] > 0
    assert flood["late_pct"] is not None and flood["loss_pct"] is not None
    assert data["steps"] == []  # the media scenario was not asked for
    text = md.read_text()
    assert "## Command rate" in text and "## Flood" in text
