"""Address learning ("latching"), spec section 6, as pure code.

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
* another source while latched: drop, unless it is RTP with the latched SSRC
  and a sequence number within SEQ_WINDOW of the last one seen, or it comes
  within UPDATE_WINDOW seconds of the last U/L that refilled the stream (a
  U/L for a stream that already had an address; a stream's first U/L opens
  no window); then re-latch to it.
"""

from __future__ import annotations

from typing import Any

UPDATE_WINDOW = 10.0
SEQ_WINDOW = 536

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
    # Latched and the source differs: re-latch only for the same stream.
    relatch = False
    if now - st.last_update < UPDATE_WINDOW:
        relatch = True
    elif not st.is_rtcp and st.ssrc is not None:
        hdr = rtp_header_untrusted(buf, n)
        if hdr is not None and hdr[0] == st.ssrc:
            dist = (hdr[1] - st.seq) & 0xFFFF
            if dist <= SEQ_WINDOW or dist >= 0x10000 - SEQ_WINDOW:
                relatch = True
    if not relatch:
        return DROP
    st.remote = src
    st.untrusted = True
    if not st.is_rtcp:
        hdr = rtp_header_untrusted(buf, n)
        if hdr is not None:
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
    if st.remote is not None:
        st.last_update = now
    if st.untrusted and not st.asymmetric:
        return
    if st.remote != remote:
        st.remote = remote
        st.latched = bool(st.asymmetric)
