"""Media port allocation: even RTP / odd RTCP pairs inside -m/-M.

Pure bookkeeping: the actual binding is a callback, so the same table serves
IPv4 and IPv6 (one table each, as in rtpproxy) and tests can fake the bind.

Order of candidates follows rtpproxy's port table: a table of the even ports
of the range, shuffled once at start (unless sequential, ``-b``), and a
cursor that moves forward one slot per attempt; each allocation tries every
slot but the current one, once.  In random mode the slot just tried is
swapped with a random one, so the order is not easy to guess.  Sequential
mode therefore hands out ``-m``, ``-m+2``, ... and wraps, skipping pairs that
fail to bind, exactly like ``rtpproxy -b``.
"""

from __future__ import annotations

import errno
import random as _random
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Errors from bind() that mean "this pair is taken, try another"; any other
# error (EADDRNOTAVAIL: the address is not local) ends the search at once,
# with the cursor left on that pair, as in rtpproxy (create_listener()).
RETRY_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES})


class PortsExhausted(Exception):
    """No pair in the range could be bound."""


class PortTable:
    """Candidate order for the even base ports ``port_min`` .. ``port_max``.

    Both bounds are already normalised (even; ``port_max`` is the last RTP
    port, its RTCP port is ``port_max + 1``), as config.py does it.
    """

    def __init__(
        self,
        port_min: int,
        port_max: int,
        *,
        sequential: bool = False,
        skip: tuple[int, ...] = (),
        rng: _random.Random | None = None,
    ) -> None:
        self._rng = rng or _random.SystemRandom()
        self._table = list(range(port_min, port_max + 1, 2))
        if not sequential:
            self._rng.shuffle(self._table)
        self._sequential = sequential
        self._idx = len(self._table) - 1
        self._skip = frozenset(skip)
        # Pairs handed out, with a count: one port may be held on several
        # local addresses.
        self.in_use: Counter[int] = Counter()

    @property
    def size(self) -> int:
        return len(self._table)

    def allocate(self, bind_pair: Callable[[int], T]) -> tuple[int, T]:
        """Find a pair and bind it with ``bind_pair(port)``.

        ``bind_pair`` returns whatever it bound (both sockets) or raises
        OSError; an errno in RETRY_ERRNOS moves on to the next candidate, any
        other error stops the search.  Raises PortsExhausted when nothing
        could be bound.
        """
        table = self._table
        n = len(table)
        for i in range(1, n):
            idx = (self._idx + i) % n
            port = table[idx]
            # Ports in use are not skipped: like rtpproxy, the bind decides
            # (a port held on another local address may still be free here).
            if port in self._skip:
                continue
            try:
                bound = bind_pair(port)
            except OSError as exc:
                if not self._sequential:
                    self._shuffle_slot(idx)
                if exc.errno in RETRY_ERRNOS:
                    continue
                self._idx = idx
                raise PortsExhausted(str(exc)) from exc
            if not self._sequential:
                self._shuffle_slot(idx)
            self._idx = idx
            self.in_use[port] += 1
            return port, bound
        raise PortsExhausted("port range exhausted")

    def _shuffle_slot(self, idx: int) -> None:
        j = self._rng.randrange(len(self._table))
        t = self._table
        t[idx], t[j] = t[j], t[idx]

    def release(self, port: int) -> None:
        if self.in_use[port] > 1:
            self.in_use[port] -= 1
        else:
            self.in_use.pop(port, None)

    @property
    def free(self) -> int:
        return len(self._table) - len(self.in_use)
