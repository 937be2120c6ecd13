"""Replays the differential corpus (cases/*.case) against pyrtpproxy.

The expected replies (cases/*.out) were recorded from rtpproxy 3.2 with
``rtpdiff.py record``; see rtpdiff.py for the format and for how port ranges
are moved so that parallel runs do not collide.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rtpdiff

CASES = rtpdiff.load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: rtpdiff.Case) -> None:
    want = case.expected_path.read_text()
    got = rtpdiff.run_ours(case, rtpdiff.default_ours(), expected=want)
    assert case.norm(got) == case.norm(want), rtpdiff.diff_text(case, want, got, "rtpproxy", "pyrtpproxy")


def test_corpus_is_large() -> None:
    """A few hundred commands across every command letter."""
    cmds = [c for case in CASES for c in case.commands]
    assert len(cmds) >= 300
    letters = {c.split()[0][0].upper() for c in cmds if c.split()}
    assert set("UDLQGIVRCNPSX") <= letters


def test_unshift_moves_only_ports_of_the_range() -> None:
    text = "47002 127.0.0.1 && 47011 ::1 6\nnsess_created=47002 1.47002.1 9\n"
    got = rtpdiff.unshift(text, 46000, 46010, 1002)
    assert got == "46000 127.0.0.1 && 46009 ::1 6\nnsess_created=47002 1.47002.1 9\n"
    assert rtpdiff.unshift(text, 46000, 46010, 0) == text
