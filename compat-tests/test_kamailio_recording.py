"""Kamailio's start_recording() makes pyrtpproxy record the caller's media.

The call is A -> B through Kamailio; A sends an in-dialog INFO with
`X-Action: record`, and kamailio.cfg's route(MEDIA_ACTION) calls
start_recording(), which sends `R CID A B` (controllers.md section 3).
rtpproxy's R records the packets of the From party (A), in
`<-r dir>/<call-id>=<A's tag>.o.rtp` and `.o.rtcp` (`.o`: A created the
session); the relay writes them in `-S` and moves them into `-r` when the
recording ends (here: the D Kamailio sends for the BYE).  The media_stack
variants record in the ad-hoc format and, with -P, in pcap.

Checks: after media and the BYE, both files exist in -r (and nothing of the
call is left in -S); read with pyrtpproxy.formats.recfmt they hold exactly the RTP
and RTCP packets A sent after the 200 to the INFO, byte for byte, in order,
with A's source addresses (pcap: to the relay ports A sent to, valid
checksums); none of A's packets from before the INFO, none of B's; no file
for B's direction (.a.*).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio
from compat_sip import LOOPBACK, check_media, establish_call, gather, make_rtp_stream

from pyrtpproxy.formats import recfmt

PACKETS = 40  # RTP packets each way while recording
RTCP_MIN = 5  # RTCP packets B must get before A stops sending them
WAIT = 5.0  # s, for each expected step


def rtcp_rr(ssrc: int) -> bytes:
    """An RTCP receiver report with one (random) report block: 32 bytes."""
    return struct.pack("!BBHI", 0x81, 201, 7, ssrc) + os.urandom(24)


async def send_rtcp(a_sock, a_dst, b_sock, b_dst) -> list[bytes]:
    """RTCP from A's socket to its relay RTCP port until B's RTCP socket got
    RTCP_MIN of them, then until B got the last one sent (so the relay has
    handled every one).  B first sends one packet itself, so the relay
    learns B's RTCP address; A's packets sent before that are relayed to
    the address it guessed (B's RTP port + 1).  Returns what A sent."""
    sent: list[bytes] = []
    got: set[bytes] = set()
    arrived = [trio.Event()]  # set (and replaced) at each packet B gets
    ssrc_a = int.from_bytes(os.urandom(4), "big") | 1
    await b_sock.sendto(rtcp_rr(int.from_bytes(os.urandom(4), "big") | 1), b_dst)

    async def receive():
        while True:
            data, _ = await b_sock.recvfrom(65535)
            got.add(data)
            ev, arrived[0] = arrived[0], trio.Event()
            ev.set()

    with trio.move_on_after(WAIT) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            while len(got) < RTCP_MIN:
                pkt = rtcp_rr(ssrc_a)
                sent.append(pkt)
                await a_sock.sendto(pkt, a_dst)
                with trio.move_on_after(0.01):  # at most one packet per 10 ms
                    await arrived[0].wait()
            while sent[-1] not in got:
                await arrived[0].wait()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught, (
        f"B's RTCP socket got {len(got)} of the {len(sent)} RTCP packets A sent within {WAIT} s "
        f"(last one {'received' if sent and sent[-1] in got else 'not received'})"
    )
    return sent


async def wait_for_files(paths: list[Path], timeout: float = WAIT) -> None:
    """The relay moves finished recordings from -S into -r: wait for that
    (polling: the file system is the only signal)."""
    with trio.move_on_after(timeout):
        while not all(p.exists() for p in paths):
            await trio.sleep(0.02)
        return
    raise AssertionError(
        f"recordings not in -r within {timeout} s: {[str(p) for p in paths if not p.exists()]}"
    )


def check_recording(
    path: Path, expected: list[bytes], src: tuple[str, int], dst: tuple[str, int], pcap: bool, what: str
) -> None:
    rec = recfmt.read_file(path)
    ctx = f"{what} ({path})"
    assert rec.format == ("pcap" if pcap else "adhoc"), f"{ctx}: format {rec.format}"
    assert not rec.truncated, f"{ctx}: the last record is cut short"
    data = [p.data for p in rec.packets]
    if data != expected:
        missing = sum(1 for x in expected if x not in data)
        extra = sum(1 for x in data if x not in expected)
        raise AssertionError(
            f"{ctx}: {len(data)} packets recorded, {len(expected)} expected: "
            f"{missing} missing, {extra} that A did not send after the INFO"
            + ("; same packets, other order" if not missing and not extra else "")
        )
    for i, p in enumerate(rec.packets):
        assert p.src == src, f"{ctx}: packet #{i} recorded from {p.src}, A sent it from {src}"
        if pcap:
            assert p.dst == dst, f"{ctx}: packet #{i} recorded to {p.dst}, A sent it to {dst}"
            assert p.checksums_ok, f"{ctx}: packet #{i} has bad IP/UDP checksums"
    times = [p.time for p in rec.packets]
    assert times == sorted(times), f"{ctx}: arrival times go backwards"


async def test_start_recording(media_stack):
    stack = media_stack
    with trio.fail_after(25):
        a, b = await establish_call(stack.sip_addr)
        a_rtcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        b_rtcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        try:
            await a_rtcp.bind((LOOPBACK, 0))
            await b_rtcp.bind((LOOPBACK, 0))
            call = f"Call-ID {a.call_id} (A tag {a.local_tag}, B tag {b.local_tag})"
            before = make_rtp_stream(10), make_rtp_stream(10)
            await check_media(a, b, packets=before)  # not recorded

            resp = await a.request("INFO", [("X-Action", "record")])
            assert resp.status == 200 and resp.get("x-result") == "1", (
                f"{call}: INFO X-Action: record got {resp.first_line!r} X-Result {resp.get('x-result')!r}"
            )

            pa, pb = make_rtp_stream(PACKETS), make_rtp_stream(PACKETS)
            await check_media(a, b, packets=(pa, pb))
            a_rtcp_dst = (a.remote_media[0], a.remote_media[1] + 1)
            b_rtcp_dst = (b.remote_media[0], b.remote_media[1] + 1)
            rtcp_sent = await send_rtcp(a_rtcp, a_rtcp_dst, b_rtcp, b_rtcp_dst)

            await gather(a.bye(), b.answer_bye())

            base = recfmt.session_file_name(a.call_id, a.local_tag, ".o")
            rtp_file = stack.record_dir / (base + ".rtp")
            rtcp_file = stack.record_dir / (base + ".rtcp")
            assert base == f"{a.call_id}={a.local_tag}.o"
            await wait_for_files([rtp_file, rtcp_file])
            check_recording(
                rtp_file,
                pa,
                (LOOPBACK, a.rtp_port),
                tuple(a.remote_media),
                stack.pcap,
                f"{call}: RTP recording",
            )
            check_recording(
                rtcp_file,
                rtcp_sent,
                tuple(a_rtcp.getsockname()[:2]),
                a_rtcp_dst,
                stack.pcap,
                f"{call}: RTCP recording",
            )
            others = sorted(
                p.name
                for d in (stack.record_dir, stack.spool_dir)
                for p in d.iterdir()
                if a.call_id in p.name and p not in (rtp_file, rtcp_file)
            )
            assert not others, f"{call}: unexpected recording files {others} (R records A's direction only)"
        finally:
            a.close()
            b.close()
            a_rtcp.close()
            b_rtcp.close()
