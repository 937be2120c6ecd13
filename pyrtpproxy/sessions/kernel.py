"""May a session's packets be forwarded by the kernel (``--kernel``)?  Pure.

The kernel path (media/kernel.py) rewrites a packet that arrives on a
stream's local port from exactly its latched remote so that it leaves from
the peer stream's local port towards the peer's remote, as the relay would
have sent it.  Everything else still reaches the socket, so latching,
re-latching and the drop of strangers stay in userspace.

A pipe (the two RTP streams, or the two RTCP streams) is forwarded only
when nothing needs its packets in userspace: the session is complete, both
streams are latched to a remote and symmetric, IPv4 (or IPv6 when the
host forwards it), on one local address,
no prompt plays, nothing records, and no command holds it in userspace (R,
C and P move a session back before they act).  :func:`flows` gives the
forwarding entries the session wants now; the kernel side installs the
difference with what it has.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..protocol.inet import AF_INET, AF_INET6


@attrs.frozen
class Flow:
    """Packets to ``lport`` from ``src:sport`` go to ``dst:dport`` from ``out_port``."""

    lport: int  # local port the packets arrive on (the receiving stream's)
    laddr: str | None  # local address that stream is bound to (None: any)
    src: str  # the receiving stream's latched remote
    sport: int
    dst: str  # the peer stream's remote
    dport: int
    out_port: int  # the peer stream's local port
    out_addr: str | None  # the peer stream's local address (None: any)
    tos: int | None  # TOS the relay's socket would send with
    family: int = AF_INET  # AF_INET or AF_INET6


def _stream_ok(st: Any, ipv6: bool = False) -> bool:
    r = st.remote
    return (
        st.sock is not None
        and st.active
        and (st.family == AF_INET or (ipv6 and st.family == AF_INET6))
        and st.latched
        and not st.asymmetric
        and not st.on_hold
        and not st.muted
        and st.rec is None
        and st.hook is None  # analysed, re-packetised or forked: the slow path
        and r is not None
        and r[1] != 0
        and r[0] not in ("0.0.0.0", "", "::")
    )


def userspace_reason(s: Any, *, dup_small: bool = False, ipv6: bool = False) -> str | None:
    """Why the session's RTP must stay in userspace, or None."""
    if s.deleted:
        return "deleted"
    if not s.complete:
        return "incomplete"
    if s.kernel_hold:
        return "held by a command"
    if dup_small:
        return "duplicating small packets"
    if any(p is not None for p in s.players):
        return "playing"
    a, b = s.rtp
    if not (_stream_ok(a, ipv6) and _stream_ok(b, ipv6)):
        return "not latched, asymmetric, IPv6, muted, recorded or on the slow path"
    if a.laddr != b.laddr:
        return "bridged"
    return None


def _pipe(a: Any, b: Any, ipv6: bool) -> tuple[Flow, Flow] | None:
    if not (_stream_ok(a, ipv6) and _stream_ok(b, ipv6)) or a.laddr != b.laddr:
        return None
    return _flow(a, b), _flow(b, a)


def _local(addr: str | None) -> str | None:
    return None if addr in (None, "", "0.0.0.0", "::") else addr


def _flow(st: Any, peer: Any) -> Flow:
    src, dst = st.remote, peer.remote
    return Flow(
        lport=st.port,
        laddr=_local(st.laddr),
        src=src[0],
        sport=src[1],
        dst=dst[0],
        dport=dst[1],
        out_port=peer.port,
        out_addr=_local(peer.laddr),
        tos=peer.session.rtp[peer.index].tos,
        family=st.family,
    )


def flows(s: Any, *, dup_small: bool = False, ipv6: bool = False) -> tuple[Flow, ...]:
    """The forwarding entries ``s`` wants now: RTP both ways, RTCP too if latched.

    ``ipv6``: the kernel path forwards IPv6 too (the host forwards it).
    """
    if userspace_reason(s, dup_small=dup_small, ipv6=ipv6) is not None:
        return ()
    out = list(_pipe(s.rtp[0], s.rtp[1], ipv6) or ())
    out.extend(_pipe(s.rtcp[0], s.rtcp[1], ipv6) or ())
    return tuple(out)


IPV4_UDP_HEADERS = 28  # what the kernel's byte counters add to each payload
IPV6_UDP_HEADERS = 48


def apply_counts(st: Any, npkts: int, now: float, nbytes: int = 0) -> None:
    """Book ``npkts`` (``nbytes`` of payload) the kernel forwarded for ``st`` as if relayed.

    The RTP sequence number moves on by the same count, so the same-SSRC
    re-latch rule (a sequence number near the last one seen) still holds
    after minutes in the kernel.
    """
    if npkts <= 0:
        return
    st.npkts_in += npkts
    st.nrelayed += npkts
    st.nbytes += max(0, nbytes)
    st.last_rx = now
    if not st.is_rtcp:
        st.seq = (st.seq + npkts) & 0xFFFF
