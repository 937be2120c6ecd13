import errno
import random

import pytest

from pyrtpproxy.sessions.ports import PortsExhausted, PortTable


def ok(port):
    return ("bound", port)


def test_sequential_like_rtpproxy_b():
    t = PortTable(23820, 23822, sequential=True)
    assert t.allocate(ok)[0] == 23820
    assert t.allocate(ok)[0] == 23822
    with pytest.raises(PortsExhausted):
        t.allocate(ok)
    t.release(23820)
    assert t.allocate(ok)[0] == 23820


def test_sequential_skips_busy_pairs():
    t = PortTable(20000, 20010, sequential=True)

    def busy(port):
        if port == 20002:
            raise OSError(errno.EADDRINUSE, "in use")
        return port

    assert t.allocate(busy)[0] == 20000
    assert t.allocate(busy)[0] == 20004


def test_random_covers_range_even_only():
    t = PortTable(20000, 20098, rng=random.Random(1))
    got = [t.allocate(ok)[0] for _ in range(49)]
    assert all(p % 2 == 0 and 20000 <= p <= 20098 for p in got)
    assert len(set(got)) == 49
    assert got != sorted(got)
    assert t.free == 1


def test_other_errors_stop_the_search():
    t = PortTable(20000, 20010, sequential=True)

    def bad(port):
        raise OSError(errno.EINVAL, "nope")

    with pytest.raises(PortsExhausted):
        t.allocate(bad)


def test_control_port_skipped():
    t = PortTable(22220, 22224, sequential=True, skip=(22222, 22221))
    assert t.allocate(ok)[0] == 22220
    assert t.allocate(ok)[0] == 22224
