"""Smoke test of the benchmark harness: a few sessions, a few seconds, pyrtpproxy only.

It checks that the harness runs end to end and reports what it measured; it
asserts no timing (benchmarks live in bench/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_harness_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenarios",
            "control,media",
            "--steps",
            "5,10",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--control-sessions",
            "50",
            "--control-clients",
            "1",
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
    steps = [s for s in data["steps"] if s["relay"] == "pyrtpproxy"]
    # a step whose loss passed the limit on a busy machine is run again (--retries)
    assert sorted({s["n"] for s in steps}) == [5, 10]
    for s in steps:
        # media really flowed through the relay and every figure was measured
        assert s["sent"] > 0 and s["recv"] > 0 and s["relay_alive"]
        assert s["setup_failed"] == 0
        for key in ("loss_pct", "lat_p50_ms", "lat_p99_ms", "relay_cpu_pct", "us_per_pkt", "rss_mb"):
            assert s[key] is not None and s[key] >= 0, key
    assert "pyrtpproxy" in data["control"]
    assert data["meta"]["machine"]["cpu_count"] >= 1
    assert md.exists() and "pyrtpproxy" in md.read_text()
    assert (out / "bench.png").exists() or "matplotlib" in proc.stdout + proc.stderr
