"""--metrics: /metrics (Prometheus text) and /stats (JSON) over real HTTP."""

from __future__ import annotations

import json
import math
import re
import socket

import pytest
import trio
from relayutil import Peer, Relay, rtp_packet, settings

from pyrtpproxy.daemon import control, metrics
from pyrtpproxy.daemon.app import Server
from pyrtpproxy.daemon.metrics import MetricsError, attach_metrics, parse_metrics_url
from pyrtpproxy.daemon.notifier import attach_notifier

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(
    rf"^({_NAME})(\{{(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\.)*\",?)*\}})? "
    r"([-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|NaN|Inf))$"
)


def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """A strict reader for the text format (0.0.4): {name: {labels: value}}.

    Checks: every line is HELP, TYPE or a sample; TYPE comes before the
    samples of its family and only once; counters end in _total; values parse.
    """
    assert text.endswith("\n")
    out: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and help_, line
            continue
        if line.startswith("# TYPE "):
            name, _, typ = line[7:].partition(" ")
            assert typ in ("counter", "gauge", "untyped", "summary", "histogram"), line
            assert name not in types, f"TYPE twice for {name}"
            types[name] = typ
            if typ == "counter":
                assert name.endswith("_total"), name
            continue
        assert not line.startswith("#") and line.strip(), repr(line)
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert name in types, f"sample before TYPE: {line}"
        assert labels not in out.get(name, {}), f"duplicate sample {line}"
        out.setdefault(name, {})[labels] = float(value)
    return out


async def http_get(addr, target: str, method: str = "GET", raw: bytes | None = None):
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(addr[0], addr[1])
        async with stream:
            await stream.send_all(
                raw if raw is not None else f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            data = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers and method != "HEAD":
        assert int(headers["content-length"]) == len(body)
    return status, headers, body


async def start(nursery, url="tcp:127.0.0.1:0", targets=(), **kw):
    b = control.bind_control(control.parse_control_url("udp:127.0.0.1:0"))
    server = Server(settings(notify_targets=tuple(targets), **kw), [b])
    n = attach_notifier(server)
    m = attach_metrics(server, url)
    await nursery.start(server.run)
    return Relay(server, b.sockname), m, n


# ---------------------------------------------------------------- tests
def test_parse_metrics_url():
    assert parse_metrics_url("tcp:127.0.0.1:9901") == (socket.AF_INET, "127.0.0.1", 9901)
    assert parse_metrics_url("tcp:*:9901") == (socket.AF_INET, None, 9901)
    assert parse_metrics_url("tcp6:::1:9901") == (socket.AF_INET6, "::1", 9901)
    for bad in (
        "udp:127.0.0.1:9901",
        "unix:/x",
        "tcp:127.0.0.1",
        "tcp:127.0.0.1:99999",
        "127.0.0.1:9901",
        "tcp:",
        "stdio:",
    ):
        with pytest.raises(MetricsError):
            parse_metrics_url(bad)


def test_bind_failure_is_a_metrics_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(MetricsError, match="can't bind"):
            metrics.bind_metrics(f"tcp:127.0.0.1:{s.getsockname()[1]}")
    finally:
        s.close()


async def test_metrics_scraped_and_parsed(nursery, tmp_path):
    target = f"unix:{tmp_path}/n.sock"
    relay, m, n = await start(nursery, targets=[target], port_min=41000, port_max=41098)
    a, b = await Peer().bind(), await Peer().bind()
    p1 = int((await relay.cmd(f"U m1 127.0.0.1 {a.port} f t {target} tag")).split()[0])
    p2 = int((await relay.cmd(f"L m1 127.0.0.1 {b.port} f t")).split()[0])
    await relay.cmd("U m2 127.0.0.1 30000 f")
    for seq in range(3):
        await a.send(rtp_packet(1, seq), p2)  # a -> relay (callee-facing port) -> b
        await b.recv()
    await relay.barrier()

    status, headers, body = await http_get(m.address, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    got = parse_prometheus(body.decode())
    assert got["rtpproxy_nsess_created_total"][""] == 2
    assert got["rtpproxy_sessions_active"][""] == 2
    assert got["rtpproxy_nsess_timeout_total"][""] == 0
    assert got["rtpproxy_npkts_rcvd_total"][""] == 3
    assert got["rtpproxy_npkts_relayed_total"][""] == 3
    assert got["rtpproxy_npkts_discard_total"][""] == 0
    assert got["rtpproxy_npkts_played_total"][""] == 0
    assert got["rtpproxy_ports_in_use"]['{family="ipv4"}'] == 3
    assert got["rtpproxy_ports_free"]['{family="ipv4"}'] == 50 - 3
    assert got["rtpproxy_ports_total"]['{family="ipv4"}'] == 50
    assert got["rtpproxy_notifications_queued_total"][""] == 0
    assert got["rtpproxy_notifications_dropped_total"][""] == 0
    assert got["rtpproxy_recordings_open"][""] == 0
    assert got["rtpproxy_draining"][""] == 0
    # the same table G reads
    g = (await relay.cmd("G nsess_created npkts_rcvd ncmds_rcvd")).split()
    assert int(g[0]) == got["rtpproxy_nsess_created_total"][""]
    assert int(g[1]) == got["rtpproxy_npkts_rcvd_total"][""]
    assert math.isfinite(got["rtpproxy_pps_in"][""])

    status, headers, body = await http_get(m.address, "/stats?x=1")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["nsess_created"] == 2 and doc["active_sessions"] == 2
    assert doc["npkts_relayed"] == 3
    assert doc["ports"]["ipv4"] == {"in_use": 3, "free": 47, "total": 50}
    assert doc["ports_in_use"] == 3 and doc["ports_free"] == 47
    assert doc["notify_queued"] == 0 and doc["notify_dropped"] == 0
    assert doc["recordings_open"] == 0 and doc["draining"] is False
    assert p1 != p2


async def test_counts_notifications_and_recordings(nursery, tmp_path):
    target = f"unix:{tmp_path}/none.sock"
    relay, m, n = await start(nursery, targets=[target])

    class FakeRecording:
        nopen = 4

    relay.dispatcher.recording = FakeRecording()
    n.backoff_min, n.backoff_max = 0.001, 0.01
    for i in range(3):
        n.enqueue(target, b"T%d\n" % i)
    with trio.fail_after(30):
        await n.wait_for(lambda: n.dropped == 3)  # nobody listens: dropped after retries
    status, _, body = await http_get(m.address, "/metrics")
    got = parse_prometheus(body.decode())
    assert got["rtpproxy_notifications_queued_total"][""] == 3
    assert got["rtpproxy_notifications_dropped_total"][""] == 3
    assert got["rtpproxy_notifications_pending"][""] == 0
    assert got["rtpproxy_recordings_open"][""] == 4
    doc = json.loads((await http_get(m.address, "/stats"))[2])
    assert doc["notify_dropped"] == 3 and doc["recordings_open"] == 4


async def test_draining_gauge(nursery):
    relay, m, _ = await start(nursery)
    await relay.cmd("U d1 127.0.0.1 30000 f")
    relay.server.drain()
    got = parse_prometheus((await http_get(m.address, "/metrics"))[2].decode())
    assert got["rtpproxy_draining"][""] == 1
    assert await relay.cmd("U d2 127.0.0.1 30000 f") == "E99"


async def test_http_errors(nursery):
    relay, m, _ = await start(nursery)
    assert (await http_get(m.address, "/"))[0] == 404
    assert (await http_get(m.address, "/metrics/../etc"))[0] == 404
    assert (await http_get(m.address, "/metrics", method="POST"))[0] == 405
    status, headers, body = await http_get(m.address, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert (await http_get(m.address, "", raw=b"garbage\r\n\r\n"))[0] == 400
    big = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await http_get(m.address, "", raw=big))[0] == 431
    # HTTP/1.0 request line only, then EOF
    with trio.fail_after(10):
        s = trio.socket.socket()
        await s.connect(m.address)
        await s.send(b"GET /stats HTTP/1.0\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := await s.recv(65536):
            data += chunk
        s.close()
    assert data.startswith(b"HTTP/1.0 200 OK\r\n")


async def test_silent_client_is_timed_out(nursery, autojump_clock):
    relay, m, _ = await start(nursery)
    s = trio.socket.socket()
    await s.connect(m.address)
    await s.send(b"GET /metr")
    with trio.fail_after(metrics.REQUEST_TIMEOUT + 5):
        assert await s.recv(100) == b""  # closed without an answer
    s.close()
    assert m.active == 0
    assert (await http_get(m.address, "/metrics"))[0] == 200
