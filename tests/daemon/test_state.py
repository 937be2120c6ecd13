"""--state: calls survive kill -9 and SIGTERM restarts (SQLite and Redis), a
store that goes away and comes back, old and corrupt state files.

Every relay here is a real ``python -m pyrtpproxy`` process on loopback;
the Redis tests start their own ``redis-server`` on a loopback port and stop
it by pid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

PY = sys.executable
READY_TIMEOUT = 20.0
REPLY_TIMEOUT = 5.0
REDIS = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def media_range() -> tuple[int, int]:
    # A restored port must not have been taken meanwhile by someone else:
    # below Linux's ephemeral range (32768-60999) and the ranges the other
    # tests' and benchmarks' relays use (10000-32000, 35000-65000).
    base = 2000 + random.randrange(0, 10) * 400
    return base, base + 399


def rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + b"\xd5" * 160


class Relay:
    """One pyrtpproxy process with --state; restartable with the same arguments."""

    def __init__(
        self, tmp: Path, state: str, *extra: str, node: str = "n1", media: tuple | None = None
    ) -> None:
        self.tmp = tmp
        lo, hi = self.media = media or media_range()
        # The control port must be free again at each restart: in the relay's
        # own window (the relay skips it), not in the ephemeral range.
        self.port = hi - 1
        self.args = [
            PY, "-m", "pyrtpproxy", "-f", "-F",
            "-s", f"udp:127.0.0.1:{self.port}",
            "-l", "127.0.0.1", "-m", str(lo), "-M", str(hi),
            "-d", "INFO", "--state", state, "--state-node", node, *extra,
        ]  # fmt: skip
        self.p: subprocess.Popen | None = None
        self.log = tmp / f"relay-{self.port}.log"
        self._cookie = 0

    def start(self, env: dict | None = None, wait: bool = True) -> float:
        e = dict(os.environ)
        e.update(env or {})
        with open(self.log, "a") as fe:
            self.p = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fe, env=e
            )
        return self.wait_ready() if wait else 0.0

    def wait_ready(self) -> float:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self.p.poll() is None, f"relay exited {self.p.returncode}: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "relay not ready"
            try:
                if self.cmd("V", timeout=0.2) == "20040107":
                    return time.monotonic()
            except OSError:
                pass

    def cmd(self, text: str, timeout: float = REPLY_TIMEOUT) -> str:
        self._cookie += 1
        cookie = f"k{self._cookie}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect(("127.0.0.1", self.port))
            s.send(f"{cookie} {text}".encode())
            while True:
                reply = s.recv(65535).decode()
                if reply.startswith(cookie + " "):
                    return reply[len(cookie) + 1 :].rstrip("\n")

    def kill9(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def term(self) -> int:
        os.kill(self.p.pid, signal.SIGTERM)
        return self.p.wait(15)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)


class Call:
    """Two loopback phones and the relay ports between them."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay, self.name = relay, name
        self.a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.a, self.b):
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.2)
        self.seq = 0

    def setup(self, *mods: str) -> None:
        r = self.relay
        self.pa = int(
            r.cmd(f"U {self.name} 127.0.0.1 {self.a.getsockname()[1]} ft{' '.join(mods)}").split()[0]
        )
        self.pb = int(r.cmd(f"L {self.name} 127.0.0.1 {self.b.getsockname()[1]} ft tt").split()[0])

    def exchange(self, tries: int = 25) -> None:
        """One packet each way arrives (retried: the first may race a restart)."""
        for src, dst, port, ssrc in ((self.a, self.b, self.pb, 1), (self.b, self.a, self.pa, 2)):
            for _ in range(tries):
                self.seq += 1
                src.sendto(rtp(self.seq, ssrc), ("127.0.0.1", port))
                try:
                    _data, frm = dst.recvfrom(65535)
                except TimeoutError:
                    continue
                assert frm == ("127.0.0.1", self.pa if dst is self.b else self.pb)
                _drain(dst)
                break
            else:
                raise AssertionError(f"{self.name}: no media towards port {port}")

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _drain(s: socket.socket) -> None:
    s.setblocking(False)
    try:
        while True:
            s.recv(65535)
    except BlockingIOError:
        pass
    finally:
        s.settimeout(0.2)


@pytest.fixture
def cleanup():
    things: list = []
    yield things
    for t in reversed(things):
        t.stop() if hasattr(t, "stop") else t.close()


# ---- redis-server, started per test on a loopback port and stopped by pid ----------------


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        self.dir = tmp
        self.p: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.p = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(100).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            assert self.p.poll() is None, "redis-server exited"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def sessions(self, node: str) -> dict:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return {
                k.decode(): json.loads(v) for k, v in r.hgetall(f"pyrtpproxy:node:{node}:sessions").items()
            }
        finally:
            r.close()


@pytest.fixture
def redis_server(tmp_path, cleanup):
    if REDIS is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server as root)")
    pytest.importorskip("redis", reason="the redis extra is not installed")
    srv = RedisServer(tmp_path)
    srv.start()
    cleanup.append(srv)
    return srv


@pytest.fixture(params=["sqlite", "redis"])
def state_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state.db'}"
    return request.getfixturevalue("redis_server").url


# ---- restarts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_calls_survive_a_restart(tmp_path, cleanup, state_url, how):
    (tmp_path / "rec").mkdir()
    relay = Relay(tmp_path, state_url, "-r", str(tmp_path / "rec"))
    cleanup.append(relay)
    relay.start()
    calls = [Call(relay, f"call{i}") for i in range(3)]
    cleanup.extend(calls)
    for c in calls:
        c.setup()
        c.exchange()
    before = relay.cmd("Q call0 ft tt")
    if how == "kill9":
        relay.kill9()
    else:
        assert relay.term() == 0
    relay.start()
    for c in calls:
        c.exchange()  # same relay ports, remotes and latches
    # Q, D work on restored sessions; counters went on from where they were
    q = relay.cmd("Q call0 ft tt").split()
    assert int(q[0]) > 0 and int(q[1]) >= int(before.split()[1]) + 1
    assert relay.cmd("D call1 ft tt") == "0"
    assert relay.cmd("Q call1 ft tt") == "E50"
    assert relay.cmd("R call0 ft tt") == "0"  # R works on a restored session
    # an update of a restored session answers its same port
    assert int(relay.cmd(f"U call2 127.0.0.1 {calls[2].a.getsockname()[1]} ft tt").split()[0]) == calls[2].pa
    relay.kill9()
    relay.start()
    assert relay.cmd("Q call1 ft tt") == "E50"  # the D was durable
    calls[0].exchange()
    calls[2].exchange()


def test_stranger_cannot_take_a_restored_latched_stream(tmp_path, cleanup):
    relay = Relay(tmp_path, f"sqlite:{tmp_path / 's.db'}")
    cleanup.append(relay)
    relay.start()
    c = Call(relay, "sec")
    cleanup.append(c)
    c.setup()
    c.exchange()
    deadline = time.monotonic() + 10
    while True:  # latch events reach the store asynchronously
        with sqlite3.connect(tmp_path / "s.db") as ro:
            d = json.loads(ro.execute("SELECT data FROM sessions").fetchone()[0])
        if all(st["latched"] for st in d["rtp"]):
            break
        assert time.monotonic() < deadline, d
        time.sleep(0.05)
    relay.kill9()
    relay.start()
    evil = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cleanup.append(evil)
    evil.bind(("127.0.0.1", 0))
    evil.settimeout(0.3)
    for i in range(5):
        evil.sendto(rtp(1000 + i, 0xBAD), ("127.0.0.1", c.pb))
    with pytest.raises(TimeoutError):
        c.b.recvfrom(65535)
    c.exchange()
    with pytest.raises(TimeoutError):
        evil.recvfrom(65535)


def test_restart_under_load_with_random_kills(tmp_path, cleanup, state_url):
    """20 calls with media both ways; kill -9 at random moments, new calls
    being set up meanwhile; every answered call relays again after each restart."""
    relay = Relay(tmp_path, state_url)
    cleanup.append(relay)
    relay.start()
    calls = [Call(relay, f"load{i}") for i in range(20)]
    cleanup.extend(calls)
    for c in calls:
        c.setup()
    stop = threading.Event()

    def pump() -> None:  # 50 packets/s per direction per call
        seq = 0
        while not stop.is_set():
            seq += 1
            for c in calls:
                try:
                    c.a.sendto(rtp(seq, 1), ("127.0.0.1", c.pb))
                    c.b.sendto(rtp(seq, 2), ("127.0.0.1", c.pa))
                except OSError:
                    pass
            stop.wait(0.02)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rng = random.Random(os.getpid())
    answered: dict[str, int] = {}
    try:
        for rnd in range(3):
            # new calls keep coming in while the relay dies at a random moment
            killer = threading.Timer(rng.uniform(0.0, 0.4), relay.kill9)
            killer.start()
            for i in range(30):
                name = f"new{rnd}-{i}"
                try:
                    answered[name] = int(relay.cmd(f"U {name} 127.0.0.1 9 ft", timeout=0.5).split()[0])
                except OSError:
                    break
            killer.join()
            relay.kill9()
            relay.start()
            for name, port in answered.items():
                # every answered U survived, on its port: a retry answers the same
                assert int(relay.cmd(f"U {name} 127.0.0.1 9 ft").split()[0]) == port, name
    finally:
        stop.set()
        t.join()
    for c in calls:
        c.exchange()
        assert relay.cmd(f"Q {c.name} ft tt").split()[0] != "E50"


def test_kill_between_durable_write_and_reply(tmp_path, cleanup):
    relay = Relay(tmp_path, f"sqlite:{tmp_path / 's.db'}")
    cleanup.append(relay)
    relay.start(env={"PYRTPPROXY_TEST_KILL_AFTER_COMMIT": "1"})
    c = Call(relay, "window")
    cleanup.append(c)
    with pytest.raises(TimeoutError):
        relay.cmd(f"U window 127.0.0.1 {c.a.getsockname()[1]} ft", timeout=3)
    assert relay.p.wait(10) == -signal.SIGKILL
    relay.start()
    # The write was durable, the reply never left: the session is there and
    # the controller's retry gets the port the relay had allocated.
    assert relay.cmd("Q window ft") != "E50"
    c.setup()
    c.exchange()


# ---- the store goes away and comes back ------------------------------------------------------


def _stats(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())["state"]


def test_redis_disappears_and_returns(tmp_path, cleanup, redis_server):
    mport = free_port(socket.SOCK_STREAM)
    relay = Relay(tmp_path, redis_server.url, "--metrics", f"tcp:127.0.0.1:{mport}")
    cleanup.append(relay)
    relay.start()
    c1 = Call(relay, "up")
    cleanup.append(c1)
    c1.setup()
    c1.exchange()
    assert len(redis_server.sessions("n1")) == 1
    redis_server.stop()
    # The relay keeps relaying and answering (replies do not wait for a dead store)
    c1.exchange()
    c2 = Call(relay, "during")
    cleanup.append(c2)
    c2.setup()
    c2.exchange()
    assert relay.cmd("D up ft tt") == "0"
    # redis-server comes back empty (no persistence): the relay catches up
    redis_server.start()
    deadline = time.monotonic() + 15
    while set(redis_server.sessions("n1")) != {json.dumps(["during", "ft"], separators=(",", ":"))}:
        assert time.monotonic() < deadline, redis_server.sessions("n1")
        time.sleep(0.1)
    st = _stats(mport)  # the outage was counted, the catch-up written
    assert st["commit_errors"] > 0 and st["store_down"] == 0 and st["node"] == "n1"
    relay.kill9()
    relay.start()
    c2.exchange()
    assert relay.cmd("Q up ft tt") == "E50"
    assert _stats(mport)["restored"] == 1


def test_sqlite_file_locked_by_another_writer_is_survived(tmp_path, cleanup):
    path = tmp_path / "s.db"
    relay = Relay(tmp_path, f"sqlite:{path}")
    cleanup.append(relay)
    relay.start()
    c = Call(relay, "locked")
    cleanup.append(c)
    c.setup()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # the store is "slow": every commit fails for a while
    try:
        c.exchange()
        assert relay.cmd("U other 127.0.0.1 9 ft").split()[0].isdigit()
    finally:
        db.execute("ROLLBACK")
        db.close()
    c.exchange()
    deadline = time.monotonic() + 15
    while True:  # caught up: both sessions are in the file
        with sqlite3.connect(path) as ro:
            n = ro.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
        if n == 2:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    relay.kill9()
    relay.start()
    assert relay.cmd("Q other ft") != "E50"
    c.exchange()


# ---- what is in the store ---------------------------------------------------------------------


def _v1_row(call_id: str, tag: str, port: int, remote_port: int) -> bytes:
    """A session as schema 1 wrote it (one TTL reset, no recordings)."""
    now = time.time()

    def st(p: int, remote: int | None) -> dict:
        return {
            "port": p, "laddr": "127.0.0.1", "family": 2, "shown": "127.0.0.1", "pending": None,
            "remote": ["127.0.0.1", remote] if remote else None, "latched": False, "untrusted": False,
            "asymmetric": False, "on_hold": False, "last_update": now, "ssrc": None, "seq": 0, "nlatch": 0,
            "last_rx": None, "tos": 184, "npkts_in": 0, "nrelayed": 0, "ndropped": 0,
        }  # fmt: skip

    d = {
        "v": 1, "call_id": call_id, "tag": tag, "created": now, "complete": True, "strong": True,
        "weak": [False, False], "codecs": [None, None], "codecs_text": [None, None], "ptime": [None, None],
        "notify_socket": None, "notify_tag": None, "notify_host": None, "ttl_len": 60, "reset": now,
        "ttl_override": [None, None],
        "rtp": [st(port, remote_port), st(port + 2, remote_port + 2)],
        "rtcp": [st(port + 1, None), st(port + 3, None)],
    }  # fmt: skip
    return json.dumps(d).encode()


def _make_db(path: Path, schema: str, rows: list[tuple[str, str, bytes]]) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT)")
    db.execute("CREATE TABLE sessions(node TEXT, key TEXT, data BLOB, PRIMARY KEY(node, key))")
    db.execute("INSERT INTO meta VALUES('schema', ?)", (schema,))
    db.executemany("INSERT INTO sessions VALUES(?, ?, ?)", rows)
    db.commit()
    db.close()


def test_older_schema_file_is_migrated(tmp_path, cleanup):
    path = tmp_path / "old.db"
    relay = Relay(tmp_path, f"sqlite:{path}")
    cleanup.append(relay)
    lo = relay.media[0]
    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cleanup.extend([a, b])
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    b.settimeout(3)
    # a's packets reach stream 1 (port lo+2, remote a) and leave from stream 0
    # (port lo) towards its remote, b
    row = _v1_row("old", "ft", lo, b.getsockname()[1])
    d = json.loads(row)
    d["rtp"][1]["remote"] = ["127.0.0.1", a.getsockname()[1]]
    _make_db(path, "1", [("n1", json.dumps(["old", "ft"], separators=(",", ":")), json.dumps(d).encode())])
    relay.start()
    a.sendto(rtp(1, 7), ("127.0.0.1", lo + 2))
    data, frm = b.recvfrom(65535)
    assert frm == ("127.0.0.1", lo) and data == rtp(1, 7)
    with sqlite3.connect(path) as ro:
        assert ro.execute("SELECT v FROM meta WHERE k='schema'").fetchone()[0] == "2"
        assert json.loads(ro.execute("SELECT data FROM sessions").fetchone()[0])["v"] == 2


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(os.urandom(8192)), "corrupt or not a state file"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + os.urandom(4080)), "corrupt"),
        (lambda p: _make_db(p, "99", []), "newer than this relay"),
        (lambda p: _make_db(p, "0", []), "too old"),
        (lambda p: _make_db(p, "2", [("n1", "k", b"{not json")]), "not a session snapshot"),
    ],
    ids=["random-bytes", "bad-pages", "newer-schema", "ancient-schema", "bad-row"],
)
def test_bad_state_file_is_a_clear_error_at_start(tmp_path, make, words):
    path = tmp_path / "bad.db"
    make(path)
    lo, hi = media_range()
    p = subprocess.run(
        [PY, "-m", "pyrtpproxy", "-f", "-F", "-s", f"udp:127.0.0.1:{free_port()}", "-l", "127.0.0.1",
         "-m", str(lo), "-M", str(hi), "--state", f"sqlite:{path}", "--state-node", "n1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 1
    assert words in p.stderr, p.stderr


def test_port_that_cannot_be_bound_again_drops_only_that_session(tmp_path, cleanup):
    relay = Relay(tmp_path, f"sqlite:{tmp_path / 's.db'}")
    cleanup.append(relay)
    relay.start()
    keep, lose = Call(relay, "keep"), Call(relay, "lose")
    cleanup.extend([keep, lose])
    keep.setup()
    lose.setup()
    keep.exchange()
    relay.kill9()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cleanup.append(squatter)
    squatter.bind(("127.0.0.1", lose.pa))
    relay.start()
    assert relay.cmd("Q lose ft tt") == "E50"
    keep.exchange()
    assert "session on tag ft dropped" in relay.log.read_text()


def test_sessions_that_expired_while_down_are_notified(tmp_path, cleanup):
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cleanup.append(lst)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst.settimeout(15)
    target = f"tcp:127.0.0.1:{lst.getsockname()[1]}"
    relay = Relay(tmp_path, f"sqlite:{tmp_path / 's.db'}", "-n", target, "-T", "2", "-W", "2")
    cleanup.append(relay)
    relay.start()
    assert relay.cmd(f"U gone 127.0.0.1 9 ft tt {target} bye%20now").split()[0].isdigit()
    relay.kill9()
    time.sleep(2.5)  # the TTL runs out while the relay is down
    relay.start()
    conn, _ = lst.accept()
    with conn:
        conn.settimeout(10)
        assert conn.recv(100) == b"bye now\n"
    assert relay.cmd("Q gone ft tt") == "E50"


def test_takeover_by_node_id_through_redis(tmp_path, cleanup, redis_server):
    """Same machine, same media address: the dead node's id carries its calls on."""
    a = Relay(tmp_path, redis_server.url, node="relay-a")
    cleanup.append(a)
    a.start()
    c = Call(a, "moved")
    cleanup.append(c)
    c.setup()
    c.exchange()
    lo = a.media[0] + 400 if a.media[0] < 5600 else a.media[0] - 400
    other = Relay(tmp_path, redis_server.url, node="relay-b", media=(lo, lo + 399))
    cleanup.append(other)
    other.start()
    assert other.cmd("Q moved ft tt") == "E50"  # another id: not its calls
    other.stop()
    a.kill9()
    b = Relay(tmp_path, redis_server.url, node="relay-a", media=a.media)
    cleanup.append(b)
    b.start()
    c.relay = b
    c.exchange()
    assert b.cmd("Q moved ft tt") != "E50"


# ---- takeover by another "host": network namespaces, the media address moves ----------------

CLIENT = r"""
import json, socket, struct, sys, time
relay = (sys.argv[2], int(sys.argv[3]))
def cmd(text, timeout=2.0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"k " + text.encode(), relay)
        return s.recv(65535).decode()[2:].strip()
def rtp(seq, ssrc):
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"x" * 160
if sys.argv[1] == "ready":
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if cmd("V", 0.2) == "20040107":
                sys.exit(0)
        except OSError:
            pass
    sys.exit(1)
if sys.argv[1] == "q":
    print(cmd(sys.argv[4])); sys.exit(0)
me = sys.argv[4]
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind((me, 5000)); a.settimeout(0.2)
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind((me, 5002)); b.settimeout(0.2)
if sys.argv[1] == "setup":
    pa = int(cmd(f"U tk 127.0.0.1 5000 ft".replace("127.0.0.1", me)).split()[0])
    pb = int(cmd(f"L tk {me} 5002 ft tt").split()[0])
else:
    pa, pb = int(sys.argv[5]), int(sys.argv[6])
ok = []
for src, dst, port in ((a, b, pb), (b, a, pa)):
    for seq in range(1, 50):
        src.sendto(rtp(seq, 7), (relay[0], port))
        try:
            _d, frm = dst.recvfrom(65535)
        except TimeoutError:
            continue
        ok.append(frm[1])
        break
print(json.dumps({"pa": pa, "pb": pb, "from": ok}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns(cleanup):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) for the network namespaces")
    tag = f"st{os.getpid() % 100000}"
    names = {k: f"{tag}{k}" for k in ("a", "b", "c")}
    made = []

    class Down:
        def stop(self) -> None:
            for n in reversed(made):
                subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)

    cleanup.append(Down())
    try:
        for n in names.values():
            _ip("netns", "add", n)
            made.append(n)
            _ip("-n", n, "link", "set", "lo", "up")
        c = names["c"]
        _ip("-n", c, "link", "add", "br0", "type", "bridge")
        for side in ("a", "b"):
            _ip(
                "-n",
                c,
                "link",
                "add",
                f"v{side}c",
                "type",
                "veth",
                "peer",
                "name",
                f"v{side}",
                "netns",
                names[side],
            )
            _ip("-n", c, "link", "set", f"v{side}c", "master", "br0", "up")
            _ip("-n", names[side], "link", "set", f"v{side}", "up")
        _ip("-n", c, "addr", "add", "10.213.0.2/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        _ip("-n", names["a"], "addr", "add", "10.213.0.1/24", "dev", "va")
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"can't build the network namespaces here: {exc}")
    return names


def test_standby_in_another_namespace_takes_the_calls_over(tmp_path, cleanup, netns):
    """Relay A (namespace a) dies; the media address moves to namespace b, where a
    relay started with the same redis:// URL and A's node id carries the call on."""
    if REDIS is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server as root)")
    pytest.importorskip("redis", reason="the redis extra is not installed")
    ns = netns
    inns = lambda n, *cmd: ["ip", "netns", "exec", ns[n], *cmd]
    rport = 6390
    redis_p = subprocess.Popen(
        inns("c", REDIS, "--port", str(rport), "--bind", "10.213.0.2", "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    class Stop:
        def __init__(self, p):
            self.p = p

        def stop(self) -> None:
            if self.p.poll() is None:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)

    cleanup.append(Stop(redis_p))
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    vip = "10.213.0.1"

    def relay_in(n: str) -> subprocess.Popen:
        log = open(tmp_path / f"relay-{n}.log", "a")
        p = subprocess.Popen(
            inns(n, PY, "-m", "pyrtpproxy", "-f", "-F", "-s", f"udp:{vip}:7722", "-l", vip, "-m", "4000",
                 "-M", "4999", "-d", "INFO", "--state", f"redis://10.213.0.2:{rport}/0", "--state-node", "vip1"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        cleanup.append(Stop(p))
        return p

    def run_client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(inns("c", PY, str(client), *args), capture_output=True, text=True, timeout=60)

    # redis must be up before relay A starts
    deadline = time.monotonic() + 10
    while subprocess.run(inns("c", PY, "-c", f"import socket; socket.create_connection(('10.213.0.2', {rport}), 0.5)"),
                         capture_output=True).returncode:  # fmt: skip
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    a = relay_in("a")
    assert run_client("ready", vip, "7722").returncode == 0, (tmp_path / "relay-a.log").read_text()
    r = run_client("setup", vip, "7722", "10.213.0.2")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["from"] == [first["pa"], first["pb"]]
    # A dies; its address moves to b (what keepalived does), the ARP cache follows
    os.kill(a.pid, signal.SIGKILL)
    a.wait(10)
    _ip("-n", ns["a"], "link", "set", "va", "down")
    _ip("-n", ns["b"], "addr", "add", "10.213.0.1/24", "dev", "vb")
    _ip("-n", ns["c"], "neigh", "flush", "all")
    relay_in("b")
    assert run_client("ready", vip, "7722").returncode == 0, (tmp_path / "relay-b.log").read_text()
    r = run_client("check", vip, "7722", "10.213.0.2", str(first["pa"]), str(first["pb"]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["from"] == [first["pa"], first["pb"]]  # same relay ports
    q = run_client("q", vip, "7722", "Q tk ft tt")
    assert q.stdout.strip() != "E50"
    assert "1 session(s) restored" in (tmp_path / "relay-b.log").read_text()


def test_recording_goes_on_in_the_same_files_after_a_restart(tmp_path, cleanup):
    rec = tmp_path / "rec"
    rec.mkdir()
    relay = Relay(tmp_path, f"sqlite:{tmp_path / 's.db'}", "-r", str(rec))
    cleanup.append(relay)
    relay.start()
    c = Call(relay, "taped")
    cleanup.append(c)
    c.setup()
    c.exchange()
    assert relay.cmd("R taped ft tt") == "0"

    def sizes() -> dict:
        return {p.name: p.stat().st_size for p in rec.iterdir()}

    deadline = time.monotonic() + 15
    while not any(sizes().values()):  # the writer flushes every second
        c.exchange()
        assert time.monotonic() < deadline, sizes()
        time.sleep(0.05)
    before = sizes()
    relay.kill9()
    relay.start()
    deadline = time.monotonic() + 15
    while True:
        c.exchange()
        now = sizes()
        # the same files, appended to (not truncated, no new names)
        if set(now) == set(before) and all(now[k] > before[k] for k in before if before[k]):
            break
        assert time.monotonic() < deadline, (before, now)
        time.sleep(0.05)
    assert relay.cmd("D taped ft tt") == "0"
