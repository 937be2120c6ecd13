"""Kamailio 5.6 (Debian package, rtpproxy module) driving pyrtpproxy.

Calls are placed between two Python user agents through a real Kamailio
that calls rtpproxy_offer/answer (or rtpproxy_manage) and unforce_rtp_proxy
on pyrtpproxy, over udp: and unix: control sockets (see conftest.py).
The checks follow the call flows of /work/shared/spec/controllers.md
section 5:

* the SDP each side receives carries the relay's address and a port of the
  relay's -m/-M range;
* RTP from each side arrives at the other, byte for byte, from the relay
  port the receiver was given (symmetric relaying);
* re-INVITEs from either side get the same ports back;
* BYE deletes the session (Q then answers E50);
* a late offer (SDP in the 200 and the ACK), and a CANCEL during early media;
* 20 concurrent calls, media checked on every one.
"""

from __future__ import annotations

import compat_sip
import trio
from compat_sip import UA, SdpMedia, describe_exception, gather

PACKETS = 50  # RTP packets each way per media check
CONCURRENT_CALLS = 20


async def both(first, second):
    """Run two coroutines concurrently; return both results."""
    return await gather(first, second)


async def control(stack, command: str) -> str:
    """A command on the tests' own control socket of the relay."""
    return await trio.to_thread.run_sync(stack.control, command)


def check_relay_sdp(stack, media: SdpMedia, receiver: UA, sender: UA, what: str) -> None:
    ctx = f"{what}: SDP received by {receiver.name}"
    assert media.ip == "127.0.0.1", (
        f"{ctx} has c= address {media.ip!r}, not the relay's 127.0.0.1:\n{media.raw}"
    )
    assert media.port != sender.rtp_port, (
        f"{ctx} still carries {sender.name}'s own RTP port {media.port}: the relay did not rewrite it:\n{media.raw}"
    )
    assert stack.port_min <= media.port and media.port + 1 <= stack.port_max, (
        f"{ctx} has port {media.port}, outside the relay's range -m {stack.port_min} -M {stack.port_max}:\n"
        f"{media.raw}"
    )
    assert media.port % 2 == 0, f"{ctx} has an odd RTP port {media.port}:\n{media.raw}"
    assert media.payloads[:1] == ["0"], f"{ctx}: PCMU (0) is no longer offered first:\n{media.raw}"


async def run_call(
    stack, *, reinvites: bool = True, bye_from: str = "A", packets: int = PACKETS, label: str = "call"
) -> None:
    a = await UA.open("A", stack.sip_addr)
    b = await UA.open("B", stack.sip_addr)
    try:
        # INVITE (A's offer) -> 100 (Kamailio), 180 + SDP, 200 + SDP (B's answer), ACK
        ringing = trio.Event()

        def provisional(r):
            if r.status == 180:
                ringing.set()

        (resps, a_sdps), (_inv, b_sdp) = await both(
            a.invite(b, provisional), b.answer_invite(ringing_seen=ringing)
        )
        call = f"{label} Call-ID {a.call_id} (A tag {a.local_tag}, B tag {b.local_tag})"
        check_relay_sdp(stack, b_sdp, b, a, f"{call}, INVITE")
        assert [r.status for r in resps if r.has_sdp] == [180, 200], (
            f"{call}: A expected SDP in 180 and 200, got responses {[r.first_line for r in resps]}"
        )
        for r, m in zip([r for r in resps if r.has_sdp], a_sdps):
            check_relay_sdp(stack, m, a, b, f"{call}, {r.status} reply")
        a_port, b_port = a_sdps[-1].port, b_sdp.port  # relay ports A and B send to
        assert a_sdps[0].port == a_port, (
            f"{call}: the 180 gave A port {a_sdps[0].port} but the 200 gave {a_port} (repeated L must "
            f"answer the same port)"
        )
        assert a_port != b_port, f"{call}: A and B were both given relay port {a_port}"

        await check_media(a, b, packets, f"{call}, after the INVITE")

        q = await control(stack, f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1")
        assert not q.startswith("E"), (
            f"{call}: `Q {a.call_id} {a.local_tag};1 {b.local_tag};1` during the call answered {q!r}"
        )

        if reinvites:
            # re-INVITE from A: U with both tags (A first), L in the reply
            b_sdp2, a_sdp2 = await both(b.answer_reinvite(), a.reinvite())
            check_relay_sdp(stack, b_sdp2, b, a, f"{call}, re-INVITE from A")
            check_relay_sdp(stack, a_sdp2, a, b, f"{call}, 200 to the re-INVITE from A")
            assert (b_sdp2.port, a_sdp2.port) == (b_port, a_port), (
                f"{call}: re-INVITE from A changed the ports: B {b_port}->{b_sdp2.port}, "
                f"A {a_port}->{a_sdp2.port}"
            )
            # re-INVITE from B: U with B's tag first, L in A's reply
            a_sdp3, b_sdp3 = await both(a.answer_reinvite(), b.reinvite())
            check_relay_sdp(stack, a_sdp3, a, b, f"{call}, re-INVITE from B")
            check_relay_sdp(stack, b_sdp3, b, a, f"{call}, 200 to the re-INVITE from B")
            assert (a_sdp3.port, b_sdp3.port) == (a_port, b_port), (
                f"{call}: re-INVITE from B changed the ports: A {a_port}->{a_sdp3.port}, "
                f"B {b_port}->{b_sdp3.port}"
            )
            await check_media(a, b, packets, f"{call}, after the re-INVITEs")

        # BYE: Kamailio sends D before it forwards the BYE, so once the 200
        # is back the session must be gone.
        if bye_from == "A":
            await both(a.bye(), b.answer_bye())
        else:
            await both(b.bye(), a.answer_bye())
        cmd = f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1"
        q = await control(stack, cmd)
        assert q == "E50", f"{call}: after the BYE from {bye_from}, `{cmd}` answered {q!r}, not E50"
    finally:
        a.close()
        b.close()


async def check_media(a: UA, b: UA, packets: int, what: str) -> None:
    try:
        await compat_sip.check_media(a, b, packets)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------


def test_relay_answers_kamailio_handshake(stack):
    """What Kamailio's child_init sends, on the socket Kamailio uses."""
    assert stack.relay_control("V") == "20040107"
    assert stack.relay_control("VF 20050322") == "1"
    for cap in ("20071116", "20081102"):
        assert stack.relay_control(f"VF {cap}") in ("0", "1")


async def test_call_with_reinvites(stack):
    """INVITE/180/200/ACK, media, re-INVITE from A and from B, media, BYE."""
    with trio.fail_after(30):
        await run_call(stack, reinvites=True, bye_from="A")


async def test_bye_from_callee(stack):
    """The callee hangs up: Kamailio sends D with B's tag first."""
    with trio.fail_after(20):
        await run_call(stack, reinvites=False, bye_from="B")


async def test_late_offer(stack):
    """INVITE without SDP: the offer is in B's 200 (U, B's tag first) and the
    answer in A's ACK (L)."""
    with trio.fail_after(20):
        a = await UA.open("A", stack.sip_addr)
        b = await UA.open("B", stack.sip_addr)
        try:
            (resps, a_sdps), (_inv, b_sdp) = await both(a.invite(b, late_offer=True), b.answer_invite())
            call = f"late-offer call Call-ID {a.call_id} (A tag {a.local_tag}, B tag {b.local_tag})"
            assert [r.status for r in resps if r.has_sdp] == [200], (
                f"{call}: A expected SDP in the 200 only, got {[r.first_line for r in resps]}"
            )
            check_relay_sdp(stack, a_sdps[0], a, b, f"{call}, 200 with the offer")
            check_relay_sdp(stack, b_sdp, b, a, f"{call}, ACK with the answer")
            assert a_sdps[0].port != b_sdp.port, f"{call}: A and B were both given relay port {b_sdp.port}"
            await check_media(a, b, PACKETS, call)
            cmd = f"Q {a.call_id} {b.local_tag};1 {a.local_tag};1"  # B's U created it
            q = await control(stack, cmd)
            assert not q.startswith("E"), f"{call}: `{cmd}` during the call answered {q!r}"
            await both(a.bye(), b.answer_bye())
            q = await control(stack, cmd)
            assert q == "E50", f"{call}: after the BYE, `{cmd}` answered {q!r}, not E50"
        finally:
            a.close()
            b.close()


async def test_cancel_while_ringing(stack):
    """180 with SDP (early media flows), then CANCEL: Kamailio sends D with
    A's tag only, the session is gone."""
    with trio.fail_after(20):
        a = await UA.open("A", stack.sip_addr)
        b = await UA.open("B", stack.sip_addr)
        try:

            async def caller():
                await a.send_invite(b)
                return await a.wait_ringing()

            a_sdp, b_sdp = await both(caller(), b.ring())
            call = f"cancelled call Call-ID {a.call_id} (A tag {a.local_tag}, B tag {b.local_tag})"
            check_relay_sdp(stack, b_sdp, b, a, f"{call}, INVITE")
            check_relay_sdp(stack, a_sdp, a, b, f"{call}, 180 reply")
            await check_media(a, b, 20, f"{call}, early media")
            (ok, final), _ = await both(a.cancel(), b.accept_cancel())
            assert (ok.status, final.status) == (200, 487), (
                f"{call}: CANCEL got {ok.first_line!r}, the INVITE {final.first_line!r}"
            )
            cmd = f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1"
            q = await control(stack, cmd)
            assert q == "E50", f"{call}: after the CANCEL, `{cmd}` answered {q!r}, not E50"
        finally:
            a.close()
            b.close()


async def test_concurrent_calls(stack):
    """20 calls at once, every one with media checked both ways."""
    failures: list[str] = []

    async def one(i: int) -> None:
        try:
            with trio.fail_after(40):
                await run_call(stack, reinvites=False, bye_from="AB"[i % 2], label=f"call #{i}")
        except Exception as e:  # collect, so one failure does not hide the others
            failures.append(f"call #{i}: {describe_exception(e)}")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(CONCURRENT_CALLS):
                nursery.start_soon(one, i)
    assert not failures, f"{len(failures)} of {CONCURRENT_CALLS} calls failed:\n" + "\n".join(failures)
