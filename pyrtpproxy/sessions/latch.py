"""Address learning ("latching"), spec section 6, as pure code.

This module is the one place where the relay decides whether a packet from a
given source may enter a stream and where the stream's replies go.  The API
the media engines (and anything that mirrors them, e.g. a kernel fast path
or connected sockets) build on:

* the **fast path**: a packet whose source equals ``st.remote`` while
  ``st.latched`` is true is accepted without asking anything (every mode);
* otherwise ``decide(st, src, buf, n, now)`` answers ACCEPT or DROP and may
  move ``st.remote`` / ``st.latched``; ``st.nlatch`` grows whenever it
  (re-)latched, so a caller can notice a change by comparing it;
* ``decide`` is ``Policy(...).decider()``: :func:`accept` (below, rtpproxy's
  rules) for the default policy, so the default costs what it always did;
* ``prefill(st, addr, now)`` is the only way a U/L changes a stream;
* :func:`settled` tells whether a stream's source is final until the next
  U/L (strict policies), i.e. whether a cache of "source -> destination"
  may drop every other source without asking :func:`decide`.

Endpoint-learning modes (``--endpoint-learning``, rtpengine's names) and
``--strict-source`` are described in :class:`Policy`.

``accept(st, src, buf, n, now)`` decides whether a packet from ``src`` that
arrived on stream ``st`` is accepted, and updates the stream's remote
address and latch state.  It takes the packet bytes and the time
explicitly, touches no socket and is called by the media thread only when
the fast path (source equals the latched remote) does not apply.

Rules (rtpproxy's):
* asymmetric streams never learn: a packet is accepted when its source host
  equals the remote host (any port);
* no remote yet: learn the source and latch;
* source equals the remote but not latched yet: latch now (a packet that is
  not RTP leaves it unlatched);
* another source while not latched: take it (this is how the real address
  behind NAT is learned) and latch;
* another source while latched: drop, unless it is valid RTP (never RTCP)
  with the latched SSRC and a sequence number within SEQ_WINDOW of the last
  one seen, or valid RTP with any SSRC that comes
  within UPDATE_WINDOW seconds of the last U/L that refilled the stream (a
  U/L for a stream that already had an address; a stream's first U/L opens
  no window); then re-latch to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs

UPDATE_WINDOW = 10.0
SEQ_WINDOW = 536
LEARN_WINDOW = 3.0  # delayed / heuristic learning (rtpengine's 3 s)

IMMEDIATE = "immediate"
DELAYED = "delayed"
HEURISTIC = "heuristic"
OFF = "off"
MODES = (IMMEDIATE, DELAYED, HEURISTIC, OFF)

ACCEPT = 1
DROP = 0


def rtp_header_untrusted(buf: Any, n: int) -> tuple[int, int] | None:
    """(ssrc, seq) of an RTP v2 packet, or None if it does not look like one."""
    if n < 12 or (buf[0] & 0xC0) != 0x80:
        return None
    ssrc = int.from_bytes(buf[8:12], "big")
    if ssrc == 0:
        return None
    return ssrc, (buf[2] << 8) | buf[3]


def _latch(st: Any, buf: Any, n: int) -> bool:
    if st.is_rtcp:
        st.latched = True
        return True
    hdr = rtp_header_untrusted(buf, n)
    if hdr is None:
        return False
    st.ssrc, st.seq = hdr
    st.latched = True
    return True


def _guess_rtcp(st: Any, src: tuple) -> None:
    """After learning an RTP address, guess the RTCP one as port + 1."""
    rtcp = st.rtcp_twin
    if rtcp is None:
        return
    cur = rtcp.remote
    if cur is not None and cur[0] == src[0]:
        return
    rtcp.remote = (src[0], src[1] + 1) + tuple(src[2:])
    # the guess is not the party's word: its next RTCP packet latches
    # (rtpproxy: rtpp_stream_guess_addr sets latched = asymmetric)
    rtcp.latched = bool(rtcp.asymmetric)
    rtcp.learn_until = 0.0
    rtcp.cand = None
    rtcp.cand_rank = -1


def accept(st: Any, src: tuple, buf: Any, n: int, now: float) -> int:
    remote = st.remote
    if st.asymmetric:
        if remote is None:
            return DROP
        return ACCEPT if src[0] == remote[0] else DROP
    if src == remote:
        if not st.latched:
            _latch(st, buf, n)
        return ACCEPT
    if remote is None or not st.latched:
        # Learn the real address (behind NAT it differs from the SDP's).
        st.remote = src
        st.untrusted = True
        _latch(st, buf, n)
        _guess_rtcp(st, src)
        st.nlatch += 1
        return ACCEPT
    # Latched and the source differs: only a valid RTP packet may re-latch an
    # RTP stream (rtpproxy's _rtpp_stream_check_latch_override): within the
    # update window any SSRC, later the latched SSRC with a nearby sequence
    # number.  RTCP never re-latches by itself; it follows the RTP address
    # (_guess_rtcp).
    if st.is_rtcp or st.ssrc is None:
        return DROP
    hdr = rtp_header_untrusted(buf, n)
    if hdr is None:
        return DROP
    if now - st.last_update >= UPDATE_WINDOW:
        if hdr[0] != st.ssrc:
            return DROP
        dist = (hdr[1] - st.seq) & 0xFFFF
        if SEQ_WINDOW < dist < 0x10000 - SEQ_WINDOW:
            return DROP
    st.remote = src
    st.untrusted = True
    st.ssrc, st.seq = hdr
    _guess_rtcp(st, src)
    st.nlatch += 1
    return ACCEPT


def prefill(st: Any, remote: tuple | None, now: float) -> None:
    """A U/L gave this stream's party address (``None``: on hold).

    The address is stored unless the stream already learned one from real
    packets (an RTCP address that was only guessed is re-prefilled).

    The update window (re-latch to any RTP source for UPDATE_WINDOW seconds)
    opens only when a U/L *refills* a stream that already has an address, as
    in rtpproxy (``rtpp_stream_prefill_addr``): never on the first U/L of a
    stream, and never on hold (rtpproxy does not prefill a null address).
    """
    if remote is None:
        return
    st.sdp = remote
    if st.remote is not None:
        st.last_update = now
    if st.untrusted and not st.asymmetric:
        return
    if st.remote != remote:
        st.remote = remote
        st.latched = bool(st.asymmetric)
        st.learn_until = 0.0
        st.cand = None
        st.cand_rank = -1


# ---- endpoint-learning policies ------------------------------------------------------
@attrs.frozen
class Policy:
    """How streams learn their party's address (chosen once, at start-up).

    ``learning``:

    * ``immediate`` (default): rtpproxy's rules, :func:`accept` above;
    * ``delayed``: the first packet opens a LEARN_WINDOW; packets are relayed
      meanwhile while replies keep going to the U/L address; the first
      packet after the window latches the stream to the source of the most
      recent valid packet (RTP header, or any RTCP) seen in it;
    * ``heuristic``: like ``delayed`` but the window's candidates are ranked:
      the U/L address and port (latches at once), then the same address,
      then the same port, then any; ties keep the current address, then the
      first seen;
    * ``off``: never learn: replies go to the U/L address only and packets
      are accepted from its host (rtpproxy's asymmetric rule).

    ``strict``: once latched, packets from any other source are dropped
    (counted by the caller), never relayed nor re-latched to, until a U/L
    refills the stream; the SSRC/sequence re-latch rule is off.  A refill
    opens UPDATE_WINDOW as usual: with ``immediate`` another RTP source may
    re-latch in it, with ``delayed``/``heuristic`` a new source restarts
    learning (the current address keeps ties).  With ``off``, only the exact
    U/L address and port are accepted.
    """

    learning: str = attrs.field(default=IMMEDIATE, validator=attrs.validators.in_(MODES))
    strict: bool = False

    @property
    def is_default(self) -> bool:
        return self.learning == IMMEDIATE and not self.strict

    def decider(self) -> Callable[[Any, tuple, Any, int, float], int]:
        """``decide(st, src, buf, n, now) -> ACCEPT|DROP`` for this policy."""
        if self.is_default:
            return accept
        if self.learning == OFF:
            return functools.partial(_decide_off, strict=self.strict)
        return functools.partial(_decide, learning=self.learning, strict=self.strict)


DEFAULT_POLICY = Policy()


def settled(st: Any, policy: Policy, now: float) -> bool:
    """True when only ``st.remote`` can enter ``st`` until its next U/L."""
    if not st.latched or st.remote is None:
        return False
    if policy.learning == OFF:
        return policy.strict
    return policy.strict and now - st.last_update >= UPDATE_WINDOW


def rank(st: Any, src: tuple) -> int:
    """Heuristic rank of ``src`` against the U/L address: 3 both, 2 host, 1 port, 0."""
    sdp = st.sdp
    if sdp is None:
        return 0
    if src[0] == sdp[0]:
        return 3 if src[1] == sdp[1] else 2
    return 1 if src[1] == sdp[1] else 0


def _settle(st: Any, src: tuple) -> None:
    """Latch ``st`` to ``src`` (learning is over)."""
    if src != st.remote:
        st.remote = src
        st.untrusted = True
        if not st.is_rtcp:
            _guess_rtcp(st, src)
    st.latched = True
    st.learn_until = 0.0
    st.cand = None
    st.cand_rank = -1
    st.nlatch += 1


def _learn(st: Any, src: tuple, buf: Any, n: int, now: float, heuristic: bool) -> int:
    """A packet while ``st`` learns (not latched)."""
    hdr = None if st.is_rtcp else rtp_header_untrusted(buf, n)
    valid = st.is_rtcp or hdr is not None
    if heuristic and st.is_rtcp and st.remote is not None and src[0] != st.remote[0]:
        # RTCP carries no SSRC/seq to judge by and phones often send none:
        # it learns only from the host its RTP sibling (or the SDP) names,
        # so a stranger's spray can't make it a candidate, even the only one.
        return DROP
    if st.learn_until == 0.0:
        st.learn_until = now + LEARN_WINDOW
        st.cand = None
        st.cand_rank = -1
    if valid:
        if heuristic:
            r = rank(st, src)
            if r == 3:
                if hdr is not None:
                    st.ssrc, st.seq = hdr
                _settle(st, src)
                return ACCEPT
            if r > st.cand_rank or (r == st.cand_rank and src == st.remote and st.cand != src):
                st.cand, st.cand_rank = src, r
                if hdr is not None:
                    st.ssrc, st.seq = hdr
            elif src == st.cand and hdr is not None:
                st.ssrc, st.seq = hdr
        else:
            st.cand = src
            if hdr is not None:
                st.ssrc, st.seq = hdr
    if now >= st.learn_until and st.cand is not None:
        _settle(st, st.cand)
        return ACCEPT if src == st.remote else DROP
    return ACCEPT


def _decide(st: Any, src: tuple, buf: Any, n: int, now: float, *, learning: str, strict: bool) -> int:
    """immediate+strict, delayed and heuristic (with or without strict)."""
    remote = st.remote
    if st.asymmetric:
        if remote is None:
            return DROP
        return ACCEPT if src[0] == remote[0] else DROP
    if learning == IMMEDIATE:
        if src == remote or remote is None or not st.latched:
            return accept(st, src, buf, n, now)
        # latched, another source: only a refill's window lets it in
        if now - st.last_update < UPDATE_WINDOW:
            return accept(st, src, buf, n, now)
        return DROP
    heuristic = learning == HEURISTIC
    if not st.latched:
        return _learn(st, src, buf, n, now, heuristic)
    if src == remote:
        return ACCEPT
    if not st.is_rtcp and now - st.last_update < UPDATE_WINDOW:
        # a U/L refilled this stream: learn again (the current address
        # stays the destination meanwhile and keeps ties); RTCP follows
        # the RTP address (_guess_rtcp), as in the default mode
        st.latched = False
        st.learn_until = 0.0
        return _learn(st, src, buf, n, now, heuristic)
    if strict or st.is_rtcp or st.ssrc is None:
        return DROP
    hdr = rtp_header_untrusted(buf, n)
    if hdr is None or hdr[0] != st.ssrc:
        return DROP
    dist = (hdr[1] - st.seq) & 0xFFFF
    if dist <= SEQ_WINDOW or dist >= 0x10000 - SEQ_WINDOW:
        st.seq = hdr[1]
        st.remote = src
        st.untrusted = True
        _guess_rtcp(st, src)
        st.nlatch += 1
        return ACCEPT
    return DROP


def _decide_off(st: Any, src: tuple, buf: Any, n: int, now: float, *, strict: bool) -> int:
    """No learning: the U/L address is the only destination."""
    remote = st.remote
    if remote is None:
        return DROP
    if src == remote:
        st.latched = True  # the engine's fast path applies from now on
        return ACCEPT
    if strict:
        return DROP
    return ACCEPT if src[0] == remote[0] else DROP
