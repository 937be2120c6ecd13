"""Smoke test of bench/state.py (--state latency, rate and restart gap): tiny load,
SQLite only; it asserts that everything was measured, never how fast."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_state_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "state.json"
    lo = 6000 + 400 * random.randrange(0, 2)  # away from the other tests' relays
    proc = subprocess.run(
        [sys.executable, "-m", "bench.state", "--sessions", "20", "--clients", "1", "--calls", "2",
         "--settle", "0.3", "--no-redis", "--json", str(out),
         "--ports", f"{lo}-{lo + 399}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    for store in ("off", "sqlite"):
        for phase in ("U", "L", "D"):
            s = r["control"][store][f"{phase} clients=1"]
            assert s["cmds"] == 20 and s["errors"] == 0 and s["timeouts"] == 0
    gap = r["restart"]["sqlite"]
    assert gap["calls"] == 2 and gap["ready_to_media_ms_max"] != float("inf")
