"""Smoke test of the benchmark's --netns topology with a --kernel relay (root only).

A few sessions for a few seconds; it asserts that media flowed through both
relays and that the figures were measured, never their values.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netnsutil import unavailable

ROOT = Path(__file__).resolve().parents[2]
REASON = unavailable()
if REASON is None and ctypes.util.find_library("nftables") is None:
    REASON = "libnftables is not installed (apt-get install libnftables1)"


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_netns_harness_with_kernel_relay(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench", "--netns", "--relay", "pyrtpproxy"]
    argv += ["--relay", "pyk=pyrtpproxy", "--relay-args", "pyk=--kernel", "--steps", "6"]
    argv += ["--duration", "2", "--warmup", "1.5", "--control-sessions", "0", "--no-pin"]
    argv += ["--out", str(out), "--quiet"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["topology"].startswith("netns")
    rows = {s["relay"]: s for s in data["steps"]}
    assert set(rows) == {"pyrtpproxy", "pyk"}
    for s in rows.values():
        assert s["sent"] > 0 and s["recv"] > 0 and s["relay_alive"] and s["setup_failed"] == 0, s
