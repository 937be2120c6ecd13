"""Whatever a controller sends, the dispatcher answers within the reply grammar."""

from __future__ import annotations

import re
import socket

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrtpproxy.daemon.dispatcher import Dispatcher, Iface, Settings
from pyrtpproxy.media.engine import MediaEngine

# E-code, V/VF/D/X answers, U/L port replies (with && parts), G/Q values
LINE = re.compile(r"^(E\d{1,2}|[0-9A-Za-z_.:=\- &-]*)$")
INFO = re.compile(
    r"^sessions created: \d+\nactive sessions: -?\d+\nactive streams: \d+\n"
    r"packets received: \d+\npackets transmitted: \d+(\naverage load: [\d.]+)?\n$"
)

WORDS = st.sampled_from(
    [
        "U",
        "L",
        "D",
        "Dw",
        "X",
        "I",
        "Il",
        "G",
        "Gv",
        "Q",
        "Qv",
        "R",
        "Rs",
        "C",
        "Cp",
        "N",
        "Na",
        "P",
        "P-1",
        "S",
        "V",
        "VF",
        "&&",
        "call",
        "f",
        "t",
        "f;1",
        "t;1",
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "30000",
        "0",
        "20050322",
        "ttl",
        "nsess_created",
        "udp:127.0.0.1:9",
        "UZ20",
        "Uc0,8",
        "UA",
        "U6",
        "Un",
        "LIE",
        "S ttl=5",
        "%zz",
        "\x00",
        "é",
        "x" * 40,
    ]
)


def make() -> Dispatcher:
    sett = Settings(ifaces=(Iface(socket.AF_INET, "127.0.0.1"),), port_min=46000, port_max=46998)
    return Dispatcher(sett, MediaEngine())  # engine not started: jobs just queue


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(WORDS, max_size=9).map(" ".join) | st.binary(max_size=80), min_size=1, max_size=6))
def test_replies_stay_in_grammar(lines):
    d = make()

    async def run():
        for line in lines:
            data = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
            reply = (await d.handle(data)).decode("utf-8", "surrogateescape")
            assert reply.endswith("\n")
            if reply.startswith("sessions created"):
                assert INFO.match(reply), reply
            else:
                assert reply.count("\n") == 1 and LINE.match(reply[:-1]), (data, reply)

    try:
        trio.run(run)
    finally:
        d.close_all()
        d.engine.stop()
