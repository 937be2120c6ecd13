"""Smoke test of bench/soak.py: a few calls for a few seconds.

It checks that the soak runs end to end (calls churned with media,
re-INVITEs with a port change, deletes and timeouts), that the relay ends
with no session left and every packet delivered, and that it writes its
JSON and PNG.  No timing is asserted (the soak's figures live in
bench/SOAK.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_runs_end_to_end(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--duration",
            "6",
            "--calls",
            "5",
            "--call-len",
            "2:4",
            "--abandon",
            "0.3",
            "--ttl",
            "2",
            "--interval",
            "1",
            "--port-min",
            "33000",
            "--port-max",
            "33398",
            "--seed",
            "3",
            "--out",
            str(out),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "soak.json").read_text())
    s = res["summary"]
    assert s["calls_started"] >= 5 and s["setup_failed"] == 0
    assert s["deleted"] > 0 and s["abandoned"] > 0 and s["reinvites"] > 0 and s["moves"] > 0
    assert s["timed_out"] == s["abandoned"]  # the abandoned calls timed out in the relay
    assert s["packets_sent"] > 0 and s["packets_lost"] < s["packets_sent"]  # media flowed (loss: SOAK.md)
    assert s["sessions_at_end"] == 0 and s["control_unanswered"] == 0 and s["relay_exit"] == 0
    assert len(res["samples"]) >= 4
    assert all(x["rss_mb"] > 0 and x["fds"] > 0 for x in res["samples"])
    assert max(x["sessions"] for x in res["samples"]) > 0
    assert (out / "soak.png").stat().st_size > 0
