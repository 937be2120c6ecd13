"""Capability table: VF answers and the ``-v`` listing."""

from __future__ import annotations

import re

import attrs
import pytest

from pyrtpproxy.protocol import caps
from pyrtpproxy.protocol.caps import CAPS, IMPLEMENTED, supports, version_listing

# protocol.md section 3.2, in order
PROTOCOL_CODES = [
    "20040107",
    "20050322",
    "20060704",
    "20071116",
    "20071218",
    "20080403",
    "20081102",
    "20081224",
    "20090810",
    "20140323",
    "20140617",
    "20141004",
    "20150330",
    "20150420",
    "20150617",
    "20191015",
    "20200226",
    "20230205",
    "20230314",
    "20230424",
    "20250523",
    "20251015",
    "20260306",
    "20260308",
    "20260309",
]


def test_table_lists_every_code_in_order() -> None:
    assert [c.code for c in CAPS] == PROTOCOL_CODES
    assert all(c.description and "\n" not in c.description for c in CAPS)
    assert all(attrs.has(type(c)) for c in CAPS)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        CAPS[0].code = "x"  # type: ignore[misc]


def test_implemented_flags_follow_the_set() -> None:
    assert IMPLEMENTED <= set(PROTOCOL_CODES)
    for c in CAPS:
        assert c.implemented == (c.code in IMPLEMENTED)


@pytest.mark.parametrize("code", ["20040107", "20050322", "20080403", "20081102"])
def test_kamailio_essentials(code: str) -> None:
    # Kamailio refuses the proxy without 20050322; 20081102 gates c<pt>.
    assert supports(code, notify=False)
    assert supports(code, notify=True)


def test_unknown_codes() -> None:
    for code in ["19990101", "12345678", "", "2004010", "200401070", " 20040107"]:
        assert not supports(code, notify=True)
        assert not supports(code, notify=False)


def test_only_20081224_needs_dash_n() -> None:
    # rtpproxy's handle_ver_feature special-cases 20081224 alone
    assert not supports("20081224", notify=False)
    assert supports("20081224", notify=True)
    assert supports("20150617", notify=False)
    assert supports("20150617", notify=True)


def test_every_rtpproxy_code_is_claimed() -> None:
    # rtpproxy 3.2 answers VF 1 for every code of its table (20081224 with -n)
    assert set(PROTOCOL_CODES) == IMPLEMENTED
    for code in PROTOCOL_CODES:
        assert supports(code, notify=True)
        assert supports(code, notify=False) == (code != "20081224")


def test_notify_code_when_implemented(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caps, "IMPLEMENTED", IMPLEMENTED | {"20081224", "20150617"})
    assert supports("20081224", notify=True)
    assert not supports("20081224", notify=False)
    assert supports("20150617", notify=True)


def test_known_but_not_implemented_answers_0() -> None:
    for c in CAPS:
        if not c.implemented:
            assert not supports(c.code, notify=True)


def test_version_listing_shape() -> None:
    text = version_listing()
    lines = text.split("\n")
    assert text.endswith("\n") and lines[-1] == ""
    lines = lines[:-1]
    assert lines[0] == "Basic version: 20040107"
    assert len(lines) == 1 + len(PROTOCOL_CODES)
    listed = []
    for line in lines[1:]:
        m = re.fullmatch(r"Extension (\d{8}): (.+)", line)
        assert m, line
        listed.append(m.group(1))
    assert listed == PROTOCOL_CODES
    # descriptions come from the same table
    for line, cap in zip(lines[1:], CAPS):
        assert line == f"Extension {cap.code}: {cap.description}"
