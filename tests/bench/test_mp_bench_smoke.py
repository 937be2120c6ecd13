"""Smoke test of bench/mediaproxy_latency.py: a few calls, no timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mediaproxy_latency_runs():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/mediaproxy_latency.py",
            "--connections",
            "2",
            "--calls",
            "5",
            "--media",
            "2",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["requests"] == 2 * 5 * 5 and result["errors"] == 0
