"""Fuzzing the control language: whatever a controller sends, the relay
answers once, within the reply grammar, and nothing raises.

The grammar, the reply checker and the runner are bench/fuzz.py's; the same
code runs 10^6 inputs with ``python -m bench.fuzz --inputs 1000000``.  Here:
a hypothesis test (grammar-aware: its choices shrink) against the dispatcher,
a bounded seeded run over a real UDP control socket, and checks that the
runner does see a crash, a malformed reply and a second reply.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench/

from bench.fuzz import Grammar, check_reply, run_fuzz, split_datagram
from pyrtpproxy.daemon.dispatcher import Dispatcher


class DataPicker:
    """Grammar choices drawn by hypothesis, so that a failing input shrinks."""

    def __init__(self, data) -> None:
        self.data = data

    def choice(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def chance(self, p):
        return self.data.draw(st.integers(0, 999)) < p * 1000

    def junk(self, n):
        return self.data.draw(st.binary(min_size=n, max_size=n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_dispatcher_replies_stay_in_grammar(data):
    g = Grammar(DataPicker(data))
    datagrams = [g.datagram(b"k%d" % i) for i in range(data.draw(st.integers(1, 8)))]

    async def run():
        from relayutil import start_relay

        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, port_min=47000, port_max=47498)
            for dg in datagrams:
                _cookie, body = split_datagram(dg)
                reply = await relay.dispatcher.handle(body)
                why = check_reply(body, reply)
                assert why is None, (body, reply, why)
            assert relay.server.engine.errors == 0
            nursery.cancel_scope.cancel()

    trio.run(run)


async def test_bounded_fuzz_over_the_udp_control_socket():
    """Every datagram gets exactly one reply, in the grammar; no crash."""
    with trio.fail_after(240):
        res = await run_fuzz(4000, seed=11, port_min=47500, port_max=47998)
    assert res.ok, res.summary() + "\n" + "\n".join(map(repr, res.failures))
    assert res.inputs == 4000
    # the grammar reaches past the parser: sessions are made and answered
    assert res.replies["ok"] > 400 and res.replies["E50"] > 100


def test_reply_checker():
    assert check_reply(b"U c 127.0.0.1 30000 f", b"35000 127.0.0.1\n") is None
    assert check_reply(b"U c ::1 30000 f", b"35000 ::1 6\n") is None
    assert check_reply(b"U c 127.0.0.1 30000 f t && Sttl=5", b"35000 127.0.0.1 && 0\n") is None
    assert check_reply(b"Qv c f t", b"ttl=5 npkts_ina=0 rtpa_jmax=0.000000\n") is None
    assert check_reply(b"V", b"20040107\n") is None
    assert check_reply(b"VF 20040107", b"1\n") is None
    assert check_reply(b"garbage", b"E0\n") is None
    assert check_reply(b"V", b"E4242\n") is not None  # not an error code rtpproxy has
    assert check_reply(b"E", b"E4\n") is not None
    assert check_reply(b"V", b"1\n") is not None
    assert check_reply(b"D c f", b"35000\n") is not None
    assert check_reply(b"U c 127.0.0.1 30000 f", b"35000 127.0.0.1") is not None
    assert check_reply(b"U c 127.0.0.1 30000 f", b"35000\n0\n") is not None
    assert check_reply(b"?yz", b"0\n") is not None
    assert split_datagram(b"  ab\tU x") == (b"ab", b"U x")
    assert split_datagram(b"\0a V") == (None, b"")
    assert split_datagram(b"a " + b"x" * 9000) == (b"a", b"")


@pytest.mark.parametrize("fault", ["raise", "bad", "twice", "silent"])
async def test_the_runner_sees_each_kind_of_failure(monkeypatch, fault):
    """The fuzz property fails when the relay breaks it (guards the guard)."""
    from pyrtpproxy.daemon import control
    from pyrtpproxy.protocol import commands as C

    # _handle is what every awaited path ends in (handle, handle_deferred);
    # handle_now is the transports' fast path
    real_execute, real_handle, real_send = Dispatcher.execute_now, Dispatcher._handle, control._sendto
    real_now = Dispatcher.handle_now

    def execute(self, cmd, peer_host=None):
        if type(cmd) is C.Version:
            raise RuntimeError("boom")
        return real_execute(self, cmd, peer_host)

    def mangle(reply):
        if reply == b"20040107\n":
            return b"20040107 and more\n" if fault == "bad" else b""
        return reply

    async def handle(self, data, peer_host):
        return mangle(await real_handle(self, data, peer_host))

    def handle_now(self, data, peer_host=None):
        reply = real_now(self, data, peer_host)
        return None if reply is None else mangle(reply)

    async def twice(raw, tsock, data, addr):
        await real_send(raw, tsock, data, addr)
        if data.endswith(b" 20040107\n"):
            await real_send(raw, tsock, data, addr)

    if fault == "raise":
        # V never waits: it runs through execute_now (handle_now, the fast path)
        monkeypatch.setattr(Dispatcher, "execute_now", execute)
    elif fault == "twice":
        monkeypatch.setattr(control, "_sendto", twice)
    else:
        monkeypatch.setattr(Dispatcher, "_handle", handle)
        monkeypatch.setattr(Dispatcher, "handle_now", handle_now)
    with trio.fail_after(120):
        res = await run_fuzz(300, seed=3, port_min=47500, port_max=47998, reply_timeout=0.5)
    assert not res.ok
    assert {"raise": res.crashes, "bad": res.bad_replies, "twice": res.extra, "silent": res.missing}[
        fault
    ] > 0
