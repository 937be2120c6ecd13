import errno
import random

import pytest

from pyrtpproxy.sessions.ports import PortsExhausted, PortTable


def ok(port):
    return ("bound", port)


class Kernel:
    """A fake bind: a port bound once stays taken (EADDRINUSE) until freed."""

    def __init__(self):
        self.held = set()

    def __call__(self, port):
        if port in self.held:
            raise OSError(errno.EADDRINUSE, "in use")
        self.held.add(port)
        return port


def test_sequential_like_rtpproxy_b():
    k = Kernel()
    t = PortTable(23820, 23822, sequential=True)
    assert t.allocate(k)[0] == 23820
    assert t.allocate(k)[0] == 23822
    with pytest.raises(PortsExhausted):
        t.allocate(k)
    k.held.discard(23820)
    t.release(23820)
    assert t.allocate(k)[0] == 23820


def test_in_use_ports_are_tried_again():
    """rtpproxy does not skip ports it holds: the bind decides (the same
    port may be free on another local address)."""
    t = PortTable(20000, 20004, sequential=True)
    assert [t.allocate(ok)[0] for _ in range(4)] == [20000, 20002, 20004, 20000]


def test_one_pair_range_never_allocates():
    """rtpproxy tries every slot but the cursor's: one pair is never tried."""
    with pytest.raises(PortsExhausted):
        PortTable(20000, 20000, sequential=True).allocate(ok)


def test_unavailable_address_advances_the_cursor():
    """EADDRNOTAVAIL ends the search at once (E72) and the cursor stays on
    the pair that failed, so the next allocation starts after it."""
    t = PortTable(20000, 20010, sequential=True)

    def notavail(port):
        raise OSError(errno.EADDRNOTAVAIL, "not local")

    with pytest.raises(PortsExhausted):
        t.allocate(notavail)
    assert t.allocate(ok)[0] == 20002
    with pytest.raises(PortsExhausted):
        t.allocate(notavail)
    assert t.allocate(ok)[0] == 20006


def test_sequential_skips_busy_pairs():
    t = PortTable(20000, 20010, sequential=True)

    def busy(port):
        if port == 20002:
            raise OSError(errno.EADDRINUSE, "in use")
        return port

    assert t.allocate(busy)[0] == 20000
    assert t.allocate(busy)[0] == 20004


def test_random_covers_range_even_only():
    k = Kernel()
    t = PortTable(20000, 20098, rng=random.Random(1))
    got = [t.allocate(k)[0] for _ in range(30)]
    assert all(p % 2 == 0 and 20000 <= p <= 20098 for p in got)
    assert len(set(got)) == 30
    assert got != sorted(got)
    assert t.free == 20


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
