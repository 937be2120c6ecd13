"""Minimal SIP user agents, SDP and RTP helpers for the Kamailio compat tests.

Everything runs on 127.0.0.1 over plain UDP, on Trio.  The user agents are
deliberately small: they speak just enough SIP (RFC 3261 dialogs, loose
routing through one record-routing proxy, UDP retransmission absorption)
to place calls through Kamailio, and every wait has an absolute deadline.

The proxy (Kamailio) is used as the outbound proxy of both user agents:
every request is sent to it, and the Request-URI / Route headers tell it
where to go next.
"""

from __future__ import annotations

import os
import secrets
import struct

import trio

LOOPBACK = "127.0.0.1"

# Long header names for the compact forms (RFC 3261 section 7.3.3).
_COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
}


def token(nbytes: int = 6) -> str:
    return secrets.token_hex(nbytes)


def _split_commas(value: str) -> list[str]:
    """Split a header value on commas that are outside <...> and quotes."""
    parts, cur, depth, quoted = [], [], 0, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def header_param(value: str, name: str) -> str | None:
    """A ;name=value parameter of a header value (outside the <...> part)."""
    if ">" in value:
        value = value.rsplit(">", 1)[1]
    for p in value.split(";")[1:]:
        k, _, v = p.strip().partition("=")
        if k.strip().lower() == name:
            return v.strip()
    return None


def name_addr_uri(value: str) -> str:
    """The URI in a name-addr (`"x" <sip:...>;tag=..`) or addr-spec."""
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0]
    return value.split(";", 1)[0].strip()


class SipMessage:
    def __init__(self, first_line: str, headers: list[tuple[str, str]], body: bytes = b""):
        self.first_line = first_line
        self.headers = headers  # (lower-case long name, value), in order
        self.body = body

    # -- parsing -----------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes) -> SipMessage:
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError(f"no end of headers in {data[:200]!r}")
        lines = head.decode("utf-8", "replace").split("\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:  # folded line
                n, v = headers[-1]
                headers[-1] = (n, v + " " + line.strip())
                continue
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"bad header line {line!r}")
            name = name.strip().lower()
            headers.append((_COMPACT.get(name, name), value.strip()))
        msg = cls(lines[0], headers, body)
        clen = msg.get("content-length")
        if clen is not None:
            msg.body = body[: int(clen)]
        return msg

    def to_bytes(self) -> bytes:
        out = [self.first_line]
        for name, value in self.headers:
            out.append(f"{_canonical(name)}: {value}")
        out.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(out) + "\r\n\r\n").encode() + self.body

    # -- access ------------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return not self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        if self.is_request:
            return self.first_line.split(" ", 1)[0]
        return self.cseq[1]

    @property
    def status(self) -> int:
        assert not self.is_request
        return int(self.first_line.split(" ", 2)[1])

    @property
    def cseq(self) -> tuple[int, str]:
        n, m = self.get("cseq").split()
        return int(n), m.upper()

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        out: list[str] = []
        for n, v in self.headers:
            if n == name:
                out.extend(_split_commas(v))
        return out

    def tag(self, header: str) -> str | None:
        v = self.get(header)
        return None if v is None else header_param(v, "tag")

    @property
    def top_branch(self) -> str | None:
        vias = self.get_all("via")
        return header_param(vias[0], "branch") if vias else None

    @property
    def has_sdp(self) -> bool:
        ct = self.get("content-type") or ""
        return ct.split(";")[0].strip().lower() == "application/sdp" and bool(self.body)

    def summary(self) -> str:
        return f"{self.first_line!r} (Call-ID {self.get('call-id')}, CSeq {self.get('cseq')})"


def _canonical(name: str) -> str:
    special = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate"}
    return special.get(name, "-".join(p.capitalize() for p in name.split("-")))


# ---------------------------------------------------------------------------
# SDP
# ---------------------------------------------------------------------------


def make_sdp(rtp_port: int, sess_id: int, version: int, ip: str = LOOPBACK) -> bytes:
    lines = [
        "v=0",
        f"o=- {sess_id} {version} IN IP4 {ip}",
        "s=-",
        f"c=IN IP4 {ip}",
        "t=0 0",
        f"m=audio {rtp_port} RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "a=ptime:20",
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


class SdpMedia:
    def __init__(self, ip: str | None, port: int, proto: str, payloads: list[str], raw: str):
        self.ip = ip
        self.port = port
        self.proto = proto
        self.payloads = payloads
        self.raw = raw

    def __repr__(self) -> str:
        return f"SdpMedia(ip={self.ip!r}, port={self.port}, payloads={self.payloads})"


def parse_sdp(body: bytes) -> SdpMedia:
    """The first audio stream, with its effective connection address."""
    text = body.decode("utf-8", "replace")
    session_ip = None
    media = None
    media_ip = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("m="):
            if media is not None:
                break  # only the first stream
            parts = line[2:].split()
            if parts[0] != "audio":
                continue
            media = parts
        elif line.startswith("c="):
            addr = line[2:].split()[2]
            if media is None:
                session_ip = addr
            else:
                media_ip = addr
    if media is None:
        raise AssertionError(f"no audio m= line in SDP:\n{text}")
    return SdpMedia(media_ip or session_ip, int(media[1]), media[2], media[3:], text)


# ---------------------------------------------------------------------------
# RTP
# ---------------------------------------------------------------------------

RTP_PAYLOAD_LEN = 160  # 20 ms of PCMU: 12 + 160 = 172-byte packets


def make_rtp_stream(count: int, payload_type: int = 0) -> list[bytes]:
    """`count` distinct RTP packets of one stream (random SSRC, seq, ts, payload)."""
    ssrc = int.from_bytes(os.urandom(4), "big")
    seq = int.from_bytes(os.urandom(2), "big")
    ts = int.from_bytes(os.urandom(4), "big")
    out = []
    for i in range(count):
        hdr = struct.pack(
            "!BBHII",
            0x80,
            payload_type & 0x7F,
            (seq + i) & 0xFFFF,
            (ts + i * RTP_PAYLOAD_LEN) & 0xFFFFFFFF,
            ssrc,
        )
        out.append(hdr + os.urandom(RTP_PAYLOAD_LEN))
    return out


def rtp_id(pkt: bytes) -> str:
    if len(pkt) < 12:
        return f"<{len(pkt)}-byte non-RTP datagram>"
    _, _, seq, _, ssrc = struct.unpack("!BBHII", pkt[:12])
    return f"ssrc=0x{ssrc:08x} seq={seq}"


# ---------------------------------------------------------------------------
# User agent
# ---------------------------------------------------------------------------


class SipError(AssertionError):
    pass


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def describe_exception(exc: BaseException) -> str:
    return "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc))


def unwrap_group(eg: BaseExceptionGroup) -> BaseException:
    """The one real error in a nursery's exception group, or the group itself."""
    real = [e for e in _leaves(eg) if not isinstance(e, trio.Cancelled)]
    return real[0] if len(real) == 1 else eg


async def gather(*coros):
    """Run coroutines concurrently, return their results in order.  A single
    failure is raised as itself rather than wrapped in an ExceptionGroup."""
    results: list = [None] * len(coros)

    async def run(i, coro):
        results[i] = await coro

    try:
        async with trio.open_nursery() as nursery:
            for i, coro in enumerate(coros):
                nursery.start_soon(run, i, coro)
    except BaseExceptionGroup as eg:
        err = unwrap_group(eg)
        if err is eg:
            raise
        raise err from None
    return results


class UA:
    """A SIP user agent with one SIP socket and one RTP socket on loopback.

    It holds one dialog at most.  Requests always go to the proxy address.
    """

    def __init__(
        self, name: str, proxy: tuple[str, int], sip: trio.socket.SocketType, rtp: trio.socket.SocketType
    ):
        self.name = name
        self.proxy = proxy
        self.sip = sip
        self.rtp = rtp
        self.sip_port = sip.getsockname()[1]
        self.rtp_port = rtp.getsockname()[1]
        self.contact = f"sip:{name.lower()}@{LOOPBACK}:{self.sip_port}"
        self.local_tag = token(5)
        self.cseq = 1 + int.from_bytes(os.urandom(2), "big") % 1000
        self.sess_id = int.from_bytes(os.urandom(4), "big")
        self.sdp_version = 1
        # dialog state
        self.call_id: str | None = None
        self.local_uri: str | None = None
        self.remote_uri: str | None = None
        self.remote_tag: str | None = None
        self.remote_target: str | None = None
        self.route_set: list[str] = []
        # last SDP this UA received, as (ip, port): where it sends its RTP,
        # and where the peer's RTP must come from (symmetric relaying)
        self.remote_media: tuple[str, int] | None = None
        self._answered: dict[tuple[str | None, str], bytes] = {}
        self._final_seen: set[tuple[int, str, int]] = set()
        self._last_ack: bytes | None = None
        self._pending: list[SipMessage] = []
        self._invite: SipMessage | None = None

    @classmethod
    async def open(cls, name: str, proxy: tuple[str, int]) -> UA:
        sip = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        rtp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sip.bind((LOOPBACK, 0))
        await rtp.bind((LOOPBACK, 0))
        return cls(name, proxy, sip, rtp)

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def sdp(self) -> bytes:
        self.sdp_version += 1
        return make_sdp(self.rtp_port, self.sess_id, self.sdp_version)

    # -- transport -----------------------------------------------------------
    async def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        await self.sip.sendto(data, addr)

    async def _recv(self) -> tuple[SipMessage, tuple[str, int]]:
        while True:
            data, addr = await self.sip.recvfrom(65535)
            if data.strip() == b"":
                continue  # keep-alive
            msg = SipMessage.parse(data)
            if msg.is_request:
                key = (msg.top_branch, msg.method)
                if key in self._answered:  # retransmission: repeat our answer
                    await self._send(self._answered[key], addr)
                    continue
            else:
                n, m = msg.cseq
                if msg.status >= 200:
                    key3 = (n, m, msg.status)
                    if key3 in self._final_seen:  # retransmitted final response
                        if m == "INVITE" and msg.status < 300 and self._last_ack:
                            await self._send(self._last_ack, self.proxy)
                        continue
                    self._final_seen.add(key3)
            msg.source = addr  # type: ignore[attr-defined]
            return msg, addr

    async def next_message(self, what: str, accept, timeout: float) -> SipMessage:
        """The next message for which accept(msg) is true, within `timeout` s.
        Other messages are kept for later calls."""
        for i, msg in enumerate(self._pending):
            if accept(msg):
                return self._pending.pop(i)
        with trio.move_on_after(timeout):
            while True:
                msg, _ = await self._recv()
                if accept(msg):
                    return msg
                self._pending.append(msg)
        seen = "; ".join(m.summary() for m in self._pending) or "nothing else"
        raise SipError(f"UA {self.name}: no {what} within {timeout} s (got {seen})")

    async def expect_request(self, method: str, timeout: float = 5) -> SipMessage:
        def ok(m: SipMessage) -> bool:
            return (
                m.is_request
                and m.method == method
                and (self.call_id is None or m.get("call-id") == self.call_id)
            )

        return await self.next_message(f"{method} request", ok, timeout)

    async def expect_final(
        self, cseq: int, method: str, timeout: float = 5, on_provisional=None
    ) -> list[SipMessage]:
        """All responses to (cseq, method) up to and including the final one.
        on_provisional(response) is called for each 1xx as it arrives."""
        got: list[SipMessage] = []

        def ok(m: SipMessage) -> bool:
            return (not m.is_request) and m.cseq == (cseq, method) and m.get("call-id") == self.call_id

        with trio.move_on_after(timeout):
            while True:
                r = await self.next_message(f"response to {method}", ok, timeout)
                got.append(r)
                if r.status >= 200:
                    return got
                if on_provisional is not None:
                    on_provisional(r)
        raise SipError(
            f"UA {self.name}: no final response to {cseq} {method} within {timeout} s "
            f"(got {[r.first_line for r in got]})"
        )

    # -- building messages ---------------------------------------------------
    def _via(self) -> str:
        return f"SIP/2.0/UDP {LOOPBACK}:{self.sip_port};branch=z9hG4bK{token(8)};rport"

    def _request(
        self,
        method: str,
        ruri: str,
        cseq: int,
        body: bytes = b"",
        route: list[str] | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> SipMessage:
        h = [("via", self._via()), ("max-forwards", "70")]
        for r in route if route is not None else self.route_set:
            h.append(("route", r))
        h += [
            ("from", f"<{self.local_uri}>;tag={self.local_tag}"),
            ("to", f"<{self.remote_uri}>" + (f";tag={self.remote_tag}" if self.remote_tag else "")),
            ("call-id", self.call_id),
            ("cseq", f"{cseq} {method}"),
        ]
        if method in ("INVITE",):
            h.append(("contact", f"<{self.contact}>"))
        h += [(n.lower(), v) for n, v in extra or ()]
        if body:
            h.append(("content-type", "application/sdp"))
        return SipMessage(f"{method} {ruri} SIP/2.0", h, body)

    async def respond(self, req: SipMessage, status: int, reason: str, body: bytes = b"") -> None:
        h: list[tuple[str, str]] = [("via", v) for v in req.get_all("via")]
        to = req.get("to")
        if status > 100 and header_param(to, "tag") is None:
            to = f"{to};tag={self.local_tag}"
        h += [
            ("from", req.get("from")),
            ("to", to),
            ("call-id", req.get("call-id")),
            ("cseq", req.get("cseq")),
        ]
        if req.method == "INVITE" and 100 < status < 300:
            h += [("record-route", rr) for rr in req.get_all("record-route")]
            h.append(("contact", f"<{self.contact}>"))
        if body:
            h.append(("content-type", "application/sdp"))
        data = SipMessage(f"SIP/2.0 {status} {reason}", h, body).to_bytes()
        self._answered[(req.top_branch, req.method)] = data
        await self._send(data, req.source)  # type: ignore[attr-defined]

    def _take_sdp(self, msg: SipMessage) -> SdpMedia:
        if not msg.has_sdp:
            raise SipError(f"UA {self.name}: expected SDP in {msg.summary()}")
        media = parse_sdp(msg.body)
        self.remote_media = (media.ip, media.port)
        return media

    # -- UAC side ------------------------------------------------------------
    async def send_invite(self, target: UA, late_offer: bool = False) -> SipMessage:
        """Send the initial INVITE to `target` (through the proxy), with an
        SDP offer, or without one when late_offer."""
        self.call_id = f"{token(10)}@compat.test"
        self.local_uri = self.contact
        self.remote_uri = target.contact
        self.cseq += 1
        body = b"" if late_offer else self.sdp()
        self._invite = self._request("INVITE", target.contact, self.cseq, body, route=[])
        await self._send(self._invite.to_bytes(), self.proxy)
        return self._invite

    async def invite(
        self, target: UA, on_provisional=None, late_offer: bool = False
    ) -> tuple[list[SipMessage], list[SdpMedia]]:
        """Initial INVITE to `target`; collect the responses, ACK the 2xx (with
        the SDP answer when late_offer).  Returns (responses, SDPs received)."""
        await self.send_invite(target, late_offer)
        resps = await self.expect_final(self.cseq, "INVITE", on_provisional=on_provisional)
        final = resps[-1]
        if final.status != 200:
            raise SipError(f"UA {self.name}: INVITE failed: {final.first_line}")
        sdps = [self._take_sdp(r) for r in resps if r.has_sdp]
        self.remote_tag = final.tag("to")
        self.remote_target = name_addr_uri(final.get("contact"))
        self.route_set = list(reversed(final.get_all("record-route")))
        await self._ack(self.cseq, self.sdp() if late_offer else b"")
        return resps, sdps

    async def wait_ringing(self, timeout: float = 5) -> SdpMedia:
        """After send_invite(): wait for a 180 with SDP; returns that SDP."""
        r = await self.next_message(
            "180 to the INVITE",
            lambda m: (not m.is_request) and m.cseq == (self.cseq, "INVITE") and m.status == 180,
            timeout,
        )
        return self._take_sdp(r)

    async def cancel(self, timeout: float = 5) -> list[SipMessage]:
        """CANCEL the pending initial INVITE; expect 200 to the CANCEL and 487
        to the INVITE, and ACK the 487.  Returns (200, 487)."""
        inv = self._invite
        h = [(n, v) for n, v in inv.headers if n in ("via", "max-forwards", "from", "to", "call-id")]
        h.append(("cseq", f"{self.cseq} CANCEL"))
        cancel = SipMessage(f"CANCEL {inv.first_line.split()[1]} SIP/2.0", h)
        await self._send(cancel.to_bytes(), self.proxy)

        def is_resp(method):
            return lambda m: (not m.is_request) and m.cseq == (self.cseq, method) and m.status >= 200

        ok = await self.next_message("final response to CANCEL", is_resp("CANCEL"), timeout)
        resp = await self.next_message("final response to the cancelled INVITE", is_resp("INVITE"), timeout)
        if resp.status == 487:  # ACK for a non-2xx: same branch, the response's To
            h = [(n, v) for n, v in inv.headers if n in ("via", "max-forwards", "from", "call-id")]
            h += [("to", resp.get("to")), ("cseq", f"{self.cseq} ACK")]
            self._last_ack = SipMessage(f"ACK {inv.first_line.split()[1]} SIP/2.0", h).to_bytes()
            await self._send(self._last_ack, self.proxy)
        return [ok, resp]

    async def _ack(self, cseq: int, body: bytes = b"") -> None:
        ack = self._request("ACK", self.remote_target, cseq, body)
        self._last_ack = ack.to_bytes()
        await self._send(self._last_ack, self.proxy)

    async def reinvite(self) -> SdpMedia:
        """In-dialog INVITE with a new SDP version; returns the answer's SDP."""
        self.cseq += 1
        req = self._request("INVITE", self.remote_target, self.cseq, self.sdp())
        await self._send(req.to_bytes(), self.proxy)
        resps = await self.expect_final(self.cseq, "INVITE")
        if resps[-1].status != 200:
            raise SipError(f"UA {self.name}: re-INVITE failed: {resps[-1].first_line}")
        media = self._take_sdp(resps[-1])
        await self._ack(self.cseq)
        return media

    async def request(
        self, method: str, headers: list[tuple[str, str]] | None = None, timeout: float = 5
    ) -> SipMessage:
        """An in-dialog request without a body (e.g. INFO); returns the final
        response, whatever its status."""
        self.cseq += 1
        req = self._request(method, self.remote_target, self.cseq, extra=headers)
        await self._send(req.to_bytes(), self.proxy)
        resps = await self.expect_final(self.cseq, method, timeout)
        return resps[-1]

    async def bye(self) -> None:
        self.cseq += 1
        req = self._request("BYE", self.remote_target, self.cseq)
        await self._send(req.to_bytes(), self.proxy)
        resps = await self.expect_final(self.cseq, "BYE")
        if resps[-1].status != 200:
            raise SipError(f"UA {self.name}: BYE failed: {resps[-1].first_line}")

    # -- UAS side ------------------------------------------------------------
    async def take_invite(self) -> tuple[SipMessage, SdpMedia | None]:
        """Receive the initial INVITE, answer 100.  Returns (INVITE, its SDP
        or None for a late offer)."""
        inv = await self.expect_request("INVITE")
        self.call_id = inv.get("call-id")
        self.local_uri = name_addr_uri(inv.get("to"))
        self.remote_uri = name_addr_uri(inv.get("from"))
        self.remote_tag = inv.tag("from")
        self.remote_target = name_addr_uri(inv.get("contact"))
        self.route_set = inv.get_all("record-route")
        media = self._take_sdp(inv) if inv.has_sdp else None
        await self.respond(inv, 100, "Trying")
        return inv, media

    async def answer_invite(
        self, ringing_sdp: bool = True, ringing_seen: trio.Event | None = None, timeout: float = 5
    ) -> tuple[SipMessage, SdpMedia]:
        """Take the initial INVITE: 100, 180 (with SDP when ringing_sdp and the
        INVITE had an offer), 200 with SDP, then wait for the ACK.  Returns
        (INVITE, the SDP received: the INVITE's, or the ACK's for a late offer).

        When ringing_seen is given, the 200 is sent only once it is set (the
        caller got the 180): Kamailio's UDP workers may otherwise forward a
        200 sent right after the 180 first, and then drop the late 180."""
        inv, media = await self.take_invite()
        body = self.sdp()
        await self.respond(inv, 180, "Ringing", body if ringing_sdp and media is not None else b"")
        if ringing_seen is not None:
            with trio.move_on_after(timeout):
                await ringing_seen.wait()
            if not ringing_seen.is_set():
                raise SipError(f"UA {self.name}: the caller did not get the 180 within {timeout} s")
        await self.respond(inv, 200, "OK", body)
        ack = await self.expect_request("ACK")
        if media is None:
            media = self._take_sdp(ack)
        return inv, media

    async def ring(self) -> SdpMedia:
        """Take the initial INVITE, answer 100 and 180 with SDP (early media).
        Returns the INVITE's SDP."""
        inv, media = await self.take_invite()
        if media is None:
            raise SipError(f"UA {self.name}: INVITE without SDP")
        self._invite = inv
        await self.respond(inv, 180, "Ringing", self.sdp())
        return media

    async def accept_cancel(self, timeout: float = 5) -> None:
        """After ring(): wait for the CANCEL, answer 200 to it and 487 to the
        INVITE, then wait for the proxy's ACK of the 487."""
        cancel = await self.expect_request("CANCEL", timeout)
        await self.respond(cancel, 200, "OK")
        await self.respond(self._invite, 487, "Request Terminated")
        await self.expect_request("ACK", timeout)

    async def answer_reinvite(self) -> SdpMedia:
        inv = await self.expect_request("INVITE")
        media = self._take_sdp(inv)
        await self.respond(inv, 200, "OK", self.sdp())
        await self.expect_request("ACK")
        return media

    async def answer_bye(self) -> None:
        bye = await self.expect_request("BYE")
        await self.respond(bye, 200, "OK")


# ---------------------------------------------------------------------------
# Media check
# ---------------------------------------------------------------------------


async def _send_stream(ua: UA, pkts: list[bytes], interval: float) -> None:
    assert ua.remote_media is not None
    for pkt in pkts:
        await ua.rtp.sendto(pkt, ua.remote_media)
        await trio.sleep(interval)


async def _receive_stream(ua: UA, expected: list[bytes], deadline: float, report: dict) -> None:
    want = set(expected)
    got: set[bytes] = set()
    report.update(received=0, wrong_source=[], unknown=[], duplicates=0)
    with trio.move_on_at(deadline):
        while got != want:
            data, addr = await ua.rtp.recvfrom(65535)
            report["received"] += 1
            if tuple(addr[:2]) != tuple(ua.remote_media):
                report["wrong_source"].append((addr[:2], rtp_id(data)))
            if data not in want:
                report["unknown"].append(rtp_id(data))
            elif data in got:
                report["duplicates"] += 1
            got.add(data)
    report["missing"] = len(want - got)


async def check_media(
    a: UA,
    b: UA,
    count: int = 50,
    timeout: float = 10,
    interval: float = 0.001,
    packets: tuple[list[bytes], list[bytes]] | None = None,
) -> None:
    """Each side sends `count` RTP packets to the address in the SDP it got
    (or the given `packets`: (A's, B's)).
    Each side must receive every packet of the other side, byte for byte,
    from the address in the SDP it got, and nothing else."""
    if packets is None:
        pa, pb = make_rtp_stream(count), make_rtp_stream(count)
    else:
        pa, pb = packets
        count = len(pa)
    ra: dict = {}
    rb: dict = {}
    deadline = trio.current_time() + timeout
    await gather(
        _receive_stream(a, pb, deadline, ra),
        _receive_stream(b, pa, deadline, rb),
        _send_stream(a, pa, interval),
        _send_stream(b, pb, interval),
    )
    problems = []
    for ua, peer, rep in ((a, b, ra), (b, a, rb)):
        where = (
            f"RTP {peer.name}->{ua.name} ({peer.name} sent to {peer.remote_media}, "
            f"{ua.name} expects it from {ua.remote_media})"
        )
        if rep["missing"]:
            problems.append(
                f"{where}: {rep['missing']} of {count} packets not received "
                f"within {timeout} s ({rep['received']} datagrams arrived)"
            )
        if rep["wrong_source"]:
            problems.append(
                f"{where}: {len(rep['wrong_source'])} packets from the wrong source, "
                f"e.g. {rep['wrong_source'][:3]}"
            )
        if rep["unknown"]:
            problems.append(
                f"{where}: {len(rep['unknown'])} datagrams that {peer.name} did not "
                f"send (altered?), e.g. {rep['unknown'][:3]}"
            )
        if rep["duplicates"]:
            problems.append(f"{where}: {rep['duplicates']} duplicated packets")
    if problems:
        raise AssertionError("; ".join(problems))


# ---------------------------------------------------------------------------
# A call, for tests about what happens during one
# ---------------------------------------------------------------------------


async def establish_call(proxy: tuple[str, int]) -> tuple[UA, UA]:
    """A calls B through the proxy (INVITE with SDP, 180 and 200 with SDP,
    ACK); returns (A, B) with the dialog up.  The caller closes them."""
    a = await UA.open("A", proxy)
    b = await UA.open("B", proxy)
    try:
        ringing = trio.Event()

        def provisional(r):
            if r.status == 180:
                ringing.set()

        await gather(a.invite(b, provisional), b.answer_invite(ringing_seen=ringing))
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b
