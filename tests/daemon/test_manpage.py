"""man/rtpproxy.8: lints clean, has the sections operators look for, and
documents every option the command line accepts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pyrtpproxy.daemon import cli

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man" / "rtpproxy.8"
TIMEOUT = 30

SECTIONS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "PRINCIPLES OF OPERATION",
    "SIGNALS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "SECURITY",
    "COMPATIBILITY",
    "SEE ALSO",
]


def _text() -> str:
    return MAN.read_text(encoding="utf-8")


def test_mandoc_lint_clean():
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        if os.geteuid() != 0:
            pytest.skip("mandoc is not installed (make test installs it when run as root)")
        pytest.fail("mandoc is missing; as root, `make test` installs it (Debian package mandoc)")
    p = subprocess.run(
        [mandoc, "-Tlint", "-W", "style", str(MAN)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


def test_groff_warnings_clean_if_available():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    p = subprocess.run(
        [groff, "-man", "-ww", "-z", str(MAN)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_sections_in_order():
    found = [m.group(1).strip('"') for m in re.finditer(r"^\.SH (.+)$", _text(), re.M)]
    assert [s for s in found if s in SECTIONS] == SECTIONS
    assert found[0] == "NAME"


def _roff_option(opt: str) -> str:
    """How an option is spelled in the roff source (``\\-`` for each dash)."""
    return opt.replace("-", "\\-")


def test_every_option_is_documented():
    text = _text()
    shorts = [c for c in cli.SHORT_OPTS if c != ":"]
    missing = [f"-{c}" for c in shorts if not re.search(rf"\\-{re.escape(c)}(?![A-Za-z])", text)]
    longs = [o.rstrip("=") for o in cli.LONG_OPTS]
    missing += [f"--{o}" for o in longs if _roff_option(f"--{o}") not in text]
    assert missing == []


def test_every_option_has_an_entry():
    """Each option is the head of an indented paragraph (.TP then the option)."""
    text = _text()
    heads = re.findall(r"^\.TP\n(.+)$", text, re.M)
    joined = "\n".join(heads)
    for c in (c for c in cli.SHORT_OPTS if c != ":"):
        assert f"\\-{c}" in joined, f"-{c} has no .TP entry"
    for o in (o.rstrip("=") for o in cli.LONG_OPTS):
        assert _roff_option(f"--{o}") in joined, f"--{o} has no .TP entry"


def test_control_socket_forms_documented():
    text = _text()
    for form in ("udp:", "udp6:", "unix:", "cunix:", "tcp:", "tcp6:", "stdio:", "stdioc:", "systemd:"):
        assert form in text, form


def test_installed_by_the_package():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shared = data["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    assert shared["man/rtpproxy.8"] == "share/man/man8/rtpproxy.8"
