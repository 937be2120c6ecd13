"""--kernel on the command line (the kernel path itself: tests/media/test_kernel.py)."""

from __future__ import annotations

import pytest

from pyrtpproxy.daemon.cli import build_config
from pyrtpproxy.daemon.config import ConfigError


@pytest.mark.parametrize(
    ("args", "mode"),
    [
        ([], None),
        (["--kernel"], "on"),
        (["--kernel=auto"], "auto"),
        (["--kern"], "on"),
        (["--kernel=auto", "-T", "5"], "auto"),
    ],
)
def test_kernel_option(args, mode):
    assert build_config(["-F", *args]).kernel == mode


def test_kernel_option_rejects_other_values():
    with pytest.raises(ConfigError, match="--kernel=yes"):
        build_config(["-F", "--kernel=yes"])
