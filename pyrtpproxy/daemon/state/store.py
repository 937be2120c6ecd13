"""State store back ends: SQLite (one machine) and Redis (shared).

Both are synchronous and run in a worker thread, never in the Trio thread
or the media thread.  Every method takes the store's lock, so the writer's
group commits and the final flush at shutdown never overlap.

Layout
------
SQLite (``sqlite:PATH``), WAL journal, ``synchronous=FULL``::

    meta(k TEXT PRIMARY KEY, v TEXT)          -- k='schema': SCHEMA
    sessions(node TEXT, key TEXT, data BLOB, PRIMARY KEY(node, key))

Redis (``redis://HOST:PORT/DB``)::

    pyrtpproxy:schema                -> SCHEMA
    pyrtpproxy:node:<node>:sessions  -> hash key -> snapshot JSON

A group commit is one SQLite transaction, or one Redis MULTI/EXEC.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from typing import Any

from ...sessions import snapshot as snap
from ..process import StartupError


class StateError(StartupError):
    """The store cannot be used at start (bad URL, corrupt, wrong schema)."""


class StoreDown(Exception):
    """The store did not take a commit (lost, slow, full); try again later."""


class Store:
    url: str

    def open(self) -> None:
        raise NotImplementedError

    def load(self, node: str) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def commit(self, node: str, batch: dict[str, bytes | None], *, replace: bool = False) -> None:
        """Write ``batch`` (None: delete) atomically; ``replace``: the batch is
        the node's whole state, everything else of the node goes."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def open_store(url: str) -> Store:
    """A store for ``url`` (not opened yet); StateError for a bad URL."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StateError(f"--state {url}: no file name")
        return SqliteStore(path, url)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url)
    raise StateError(f"--state {url}: expected sqlite:PATH or redis://HOST:PORT/DB")


# ---- SQLite ----------------------------------------------------------------------------


class SqliteStore(Store):
    def __init__(self, path: str, url: str) -> None:
        self.path = os.path.abspath(path)
        self.url = url
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            try:
                db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StateError(f"state file {self.path}: {exc}") from None
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StateError(f"state file {self.path}: can't use WAL journal ({mode})")
                db.execute("PRAGMA synchronous=FULL")
                ok = db.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise StateError(f"state file {self.path} is corrupt: {ok}")
                db.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT)")
                row = db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if row is None and "sessions" in tables:
                    raise StateError(f"state file {self.path}: sessions without a schema version")
                if row is None:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(
                        "CREATE TABLE sessions(node TEXT, key TEXT, data BLOB, PRIMARY KEY(node, key))"
                    )
                    db.execute("INSERT INTO meta VALUES('schema', ?)", (str(snap.SCHEMA),))
                    db.execute("COMMIT")
                else:
                    self._check_schema(db, row[0])
            except sqlite3.DatabaseError as exc:
                db.close()
                raise StateError(f"state file {self.path} is corrupt or not a state file: {exc}") from None
            except BaseException:
                db.close()
                raise
            self._db = db

    def _check_schema(self, db: sqlite3.Connection, text: str) -> None:
        try:
            v = int(text)
        except ValueError:
            raise StateError(f"state file {self.path}: bad schema version {text!r}") from None
        if v > snap.SCHEMA:
            raise StateError(
                f"state file {self.path} has schema {v}, newer than this relay's ({snap.SCHEMA}): refusing it"
            )
        if v < snap.OLDEST:
            raise StateError(f"state file {self.path} has schema {v}, too old to migrate: refusing it")
        if v == snap.SCHEMA:
            return
        # Migrate every row now (decode migrates; re-encode writes the new schema).
        db.execute("BEGIN IMMEDIATE")
        try:
            for node, key, data in db.execute("SELECT node, key, data FROM sessions").fetchall():
                try:
                    new = snap.encode(snap.decode(data))
                except snap.SchemaError as exc:
                    raise StateError(f"state file {self.path}: session {key} of node {node}: {exc}") from None
                db.execute("UPDATE sessions SET data=? WHERE node=? AND key=?", (new, node, key))
            db.execute("UPDATE meta SET v=? WHERE k='schema'", (str(snap.SCHEMA),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def load(self, node: str) -> list[tuple[str, bytes]]:
        with self._lock:
            assert self._db is not None
            try:
                rows = self._db.execute("SELECT key, data FROM sessions WHERE node=?", (node,)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StateError(f"state file {self.path} is corrupt: {exc}") from None
            return [(k, bytes(d) if not isinstance(d, str) else d.encode()) for k, d in rows]

    def commit(self, node: str, batch: dict[str, bytes | None], *, replace: bool = False) -> None:
        with self._lock:
            db = self._db
            if db is None:
                raise StoreDown("closed")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if replace:
                        db.execute("DELETE FROM sessions WHERE node=?", (node,))
                    dels = [(node, k) for k, v in batch.items() if v is None]
                    puts = [(node, k, v) for k, v in batch.items() if v is not None]
                    if dels:
                        db.executemany("DELETE FROM sessions WHERE node=? AND key=?", dels)
                    if puts:
                        db.executemany("INSERT OR REPLACE INTO sessions VALUES(?, ?, ?)", puts)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreDown(str(exc)) from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.close()
                finally:
                    self._db = None


# ---- Redis -------------------------------------------------------------------------------

SCHEMA_KEY = "pyrtpproxy:schema"


def _hash_key(node: str) -> str:
    return f"pyrtpproxy:node:{node}:sessions"


class RedisStore(Store):
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._r: Any = None
        self._lock = threading.Lock()
        u = urllib.parse.urlsplit(url)
        if not u.hostname:
            raise StateError(f"--state {url}: no host")

    def open(self) -> None:
        try:
            import redis
        except ImportError:
            raise StateError(
                "--state redis://: the Python package 'redis' is not installed (pip install pyrtpproxy[redis])"
            ) from None
        with self._lock:
            try:
                r = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry_on_timeout=False,
                )
                v = r.get(SCHEMA_KEY)
                if v is None:
                    r.setnx(SCHEMA_KEY, str(snap.SCHEMA))
                    v = r.get(SCHEMA_KEY)
            except (redis.RedisError, OSError, ValueError) as exc:
                raise StateError(f"--state {self.url}: {exc}") from None
            try:
                ver = int(v)
            except (TypeError, ValueError):
                raise StateError(f"--state {self.url}: bad schema version {v!r}") from None
            if ver > snap.SCHEMA:
                raise StateError(
                    f"--state {self.url} has schema {ver}, newer than this relay's ({snap.SCHEMA}): refusing it"
                )
            if ver < snap.OLDEST:
                raise StateError(f"--state {self.url} has schema {ver}, too old to migrate: refusing it")
            self._r = r
            # Rows of older schemas are migrated as they are read (decode).

    def load(self, node: str) -> list[tuple[str, bytes]]:
        import redis

        with self._lock:
            try:
                h = self._r.hgetall(_hash_key(node))
            except (redis.RedisError, OSError) as exc:
                raise StateError(f"--state {self.url}: {exc}") from None
        return [(k.decode("utf-8", "surrogateescape"), v) for k, v in h.items()]

    def commit(self, node: str, batch: dict[str, bytes | None], *, replace: bool = False) -> None:
        import redis

        with self._lock:
            if self._r is None:
                raise StoreDown("closed")
            key = _hash_key(node)
            try:
                p = self._r.pipeline(transaction=True)
                if replace:
                    p.delete(key)
                dels = [k for k, v in batch.items() if v is None]
                puts = {k: v for k, v in batch.items() if v is not None}
                if dels:
                    p.hdel(key, *dels)
                if puts:
                    p.hset(key, mapping=puts)
                p.set(SCHEMA_KEY, str(snap.SCHEMA))
                p.execute()
            except (redis.RedisError, OSError) as exc:
                raise StoreDown(str(exc)) from None

    def close(self) -> None:
        with self._lock:
            if self._r is not None:
                try:
                    self._r.close()
                except Exception:  # pragma: no cover
                    pass
                self._r = None
