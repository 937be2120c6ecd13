"""Kamailio's rtpproxy_stream2uac/uas and rtpproxy_stop_stream2uac/uas
make pyrtpproxy play a prompt into a call.

The call is A -> B through Kamailio.  A sends in-dialog INFOs with an
`X-Action` header; kamailio.cfg's route(MEDIA_ACTION) runs the function
itself and answers 200 (see controllers.md section 3):

* stream2uac: `P-1 CID <PROMPT> session A;1 B;1`: the prompt to A, looped;
* stop2uac:   `S CID A;1 B;1`;
* stream2uas: `P-1 CID <PROMPT> session B;1 A;1`: the prompt to B;
* stop2uas:   `S CID B;1 A;1`.

`session` is the party's codec list from its U/L (`c0,101`, sent because
the relay answered `VF 20081102` with 1), so the relay plays `<PROMPT>.0`
(PCMU).  Kamailio sends no `Z`, so the relay packetises PCMU at its default
10 ms: 80 payload bytes per packet, timestamps +80.

Both parties send RTP all along (one packet every 10 ms).  The checks, with
the party the prompt plays to as the listener and the other as the talker:

* before: the listener gets the talker's packets;
* once the 200 to stream2* is back, none of the talker's packets sent from
  then on reach the listener; the listener gets the prompt instead: one SSRC,
  PT 0, consecutive sequence numbers and timestamps, payloads equal to the
  prompt file's 80-byte chunks from the first one, on past the end of the
  file (count -1 loops), from the relay address the listener sends to;
* the talker still gets the listener's packets meanwhile;
* once the 200 to stop2* is back, the talker's packets reach the listener
  again, and no prompt packet follows the first of them.
"""

from __future__ import annotations

import math
import os
import struct
import wave
from pathlib import Path

import pytest
import trio
from compat_sip import UA, establish_call, gather

from pyrtpproxy.tools import makeann

CHUNK = 80  # PCMU bytes per played packet (10 ms)
PROMPT_CHUNKS = 20  # the prompt: 200 ms, 20 packets
PLAYED = 2 * PROMPT_CHUNKS + 5  # prompt packets to get: more than two passes
INTERVAL = 0.01  # s between the parties' own RTP packets
WAIT = 5.0  # s, for each expected step


def write_prompt(template: Path) -> bytes:
    """A tone sweeping from 400 to 1200 Hz (so no two 10 ms chunks are
    alike), 8 kHz 16-bit WAV -> makeann -> <template>.0 / .8.
    Returns the PCMU file's contents."""
    n = PROMPT_CHUNKS * CHUNK
    dur = n / 8000
    samples = [
        round(12000 * math.sin(2 * math.pi * (400 * t + 800 * t * t / (2 * dur))))
        for t in (i / 8000 for i in range(n))
    ]
    wav_path = template.parent / (template.name + ".wav")
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(struct.pack(f"<{n}h", *samples))
    made = makeann.make_prompts(str(wav_path), str(template))
    assert sorted(made) == [f"{template}.0", f"{template}.8"], made
    data = Path(f"{template}.0").read_bytes()
    assert len(data) == n
    chunks = {data[i : i + CHUNK] for i in range(0, n, CHUNK)}
    assert len(chunks) == PROMPT_CHUNKS, "the tone's chunks should all differ"
    return data


@pytest.fixture(scope="session")
def prompt(media_stack) -> bytes:
    return write_prompt(media_stack.prompt)


class Party:
    """One UA's RTP: sends a stream of its own (noting the phase each packet
    was sent in), and logs what it receives in order."""

    def __init__(self, ua: UA, state: dict):
        self.ua = ua
        self.state = state  # {"phase": 0 | 1 | 2}
        self.ssrc = int.from_bytes(os.urandom(4), "big") | 1
        self.seq = int.from_bytes(os.urandom(2), "big")
        self.ts = int.from_bytes(os.urandom(4), "big")
        self.sent: dict[bytes, int] = {}  # packet -> phase when it was sent
        # received, in order: ("peer", phase it was sent in) | ("other", data, src)
        self.log: list[tuple] = []
        self._ev = trio.Event()

    def next_packet(self) -> bytes:
        hdr = struct.pack("!BBHII", 0x80, 0, self.seq, self.ts, self.ssrc)
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + 160) & 0xFFFFFFFF
        return hdr + os.urandom(160)

    async def send_loop(self) -> None:
        assert self.ua.remote_media is not None
        while True:
            pkt = self.next_packet()
            self.sent[pkt] = self.state["phase"]
            await self.ua.rtp.sendto(pkt, self.ua.remote_media)
            await trio.sleep(INTERVAL)

    async def recv_loop(self, peer: Party) -> None:
        while True:
            data, src = await self.ua.rtp.recvfrom(65535)
            if data in peer.sent:
                self.log.append(("peer", peer.sent[data]))
            else:
                self.log.append(("other", data, tuple(src[:2])))
            ev, self._ev = self._ev, trio.Event()
            ev.set()

    def count(self, kind: str, phase: int | None = None) -> int:
        return sum(1 for e in self.log if e[0] == kind and (phase is None or e[1] == phase))

    async def wait_for(self, what: str, pred, timeout: float = WAIT) -> None:
        with trio.move_on_after(timeout):
            while not pred():
                await self._ev.wait()
            return
        raise AssertionError(
            f"{self.ua.name} did not get {what} within {timeout} s (received: {self.summary()})"
        )

    def summary(self) -> str:
        return (
            f"{self.count('peer', 0)}/{self.count('peer', 1)}/{self.count('peer', 2)} of the peer's packets "
            f"sent before/during/after the prompt, {self.count('other')} others"
        )


async def action(ua: UA, name: str) -> None:
    resp = await ua.request("INFO", [("X-Action", name)])
    assert resp.status == 200 and resp.get("x-result") == "1", (
        f"INFO X-Action: {name} got {resp.first_line!r} X-Result {resp.get('x-result')!r} "
        "(route(MEDIA_ACTION) in kamailio.cfg)"
    )


def check_prompt_packets(listener: Party, talker: Party, prompt: bytes, what: str) -> None:
    played = [(d, s) for kind, *rest in listener.log if kind == "other" for d, s in [rest]]
    assert played, f"{what}: no prompt packets"
    first = played[0][0]
    ssrc = struct.unpack("!I", first[8:12])[0]
    seq0, ts0 = struct.unpack("!HI", first[2:8])
    for k, (pkt, src) in enumerate(played):
        where = f"{what}: prompt packet #{k} ({len(pkt)} bytes)"
        assert src == tuple(listener.ua.remote_media), (
            f"{where} came from {src}, not from the relay address {listener.ua.remote_media} "
            f"{listener.ua.name} sends to"
        )
        assert len(pkt) == 12 + CHUNK, f"{where}: expected 12 + {CHUNK} bytes (PCMU, 10 ms)"
        b0, b1, seq, ts, pssrc = struct.unpack("!BBHII", pkt[:12])
        assert b0 == 0x80, f"{where}: first byte 0x{b0:02x}, not 0x80"
        assert b1 & 0x7F == 0, f"{where}: payload type {b1 & 0x7F}, not 0 (PCMU, the .0 file)"
        assert bool(b1 & 0x80) == (k == 0), f"{where}: marker bit {bool(b1 & 0x80)}"
        assert pssrc == ssrc, f"{where}: SSRC 0x{pssrc:08x} changed from 0x{ssrc:08x}"
        assert pssrc != talker.ssrc, f"{where}: has {talker.ua.name}'s SSRC"
        assert seq == (seq0 + k) & 0xFFFF, f"{where}: seq {seq}, expected {(seq0 + k) & 0xFFFF}"
        assert ts == (ts0 + CHUNK * k) & 0xFFFFFFFF, (
            f"{where}: ts {ts}, expected {(ts0 + CHUNK * k) & 0xFFFFFFFF}"
        )
        i = k % PROMPT_CHUNKS
        assert pkt[12:] == prompt[i * CHUNK : (i + 1) * CHUNK], (
            f"{where}: the payload is not chunk {i} of {PROMPT_CHUNKS} of the prompt file"
        )


async def run_playback(stack, prompt: bytes, to_caller: bool) -> None:
    start, stop = ("stream2uac", "stop2uac") if to_caller else ("stream2uas", "stop2uas")
    a, b = await establish_call(stack.sip_addr)
    try:
        state = {"phase": 0}
        pa, pb = Party(a, state), Party(b, state)
        listener, talker = (pa, pb) if to_caller else (pb, pa)
        call = f"{start} in Call-ID {a.call_id} (A tag {a.local_tag}, B tag {b.local_tag})"
        async with trio.open_nursery() as nursery:
            for p, peer in ((pa, pb), (pb, pa)):
                nursery.start_soon(p.recv_loop, peer)
                nursery.start_soon(p.send_loop)

            await listener.wait_for(
                f"{talker.ua.name}'s media before {start}", lambda: listener.count("peer", 0) >= 5
            )
            await action(a, start)
            state["phase"] = 1
            await listener.wait_for(
                f"{PLAYED} prompt packets after {start}", lambda: listener.count("other") >= PLAYED
            )
            n_talker_heard = talker.count("peer", 1)
            await talker.wait_for(
                f"{listener.ua.name}'s media while the prompt plays to it",
                lambda: talker.count("peer", 1) >= n_talker_heard + 5,
            )
            # A packet sent while the prompt played may still sit in the relay
            # port's socket buffer when S takes effect; relaying it after S is
            # right (rtpproxy does the same). Only what arrived before the stop
            # was acknowledged must be free of the talker's packets.
            before_stop = len(listener.log)
            await action(a, stop)
            state["phase"] = 2
            await listener.wait_for(
                f"{talker.ua.name}'s media after {stop}", lambda: listener.count("peer", 2) >= 5
            )
            nursery.cancel_scope.cancel()

        leaked = sum(1 for e in listener.log[:before_stop] if e[:2] == ("peer", 1))
        assert leaked == 0, (
            f"{call}: {leaked} of {talker.ua.name}'s packets sent while the prompt played "
            f"reached {listener.ua.name} (the relay must suppress them)"
        )
        check_prompt_packets(listener, talker, prompt, call)
        first_after = next(i for i, e in enumerate(listener.log) if e[:2] == ("peer", 2))
        late = [i for i, e in enumerate(listener.log) if e[0] == "other" and i > first_after]
        assert not late, (
            f"{call}: {len(late)} prompt packets reached {listener.ua.name} after {talker.ua.name}'s media "
            f"came back ({stop} must end the prompt)"
        )
        assert talker.count("other") == 0, (
            f"{call}: {talker.ua.name} got {talker.count('other')} packets it should not have"
        )

        await gather(a.bye(), b.answer_bye())
        cmd = f"Q {a.call_id} {a.local_tag};1 {b.local_tag};1"
        q = await trio.to_thread.run_sync(stack.control, cmd)
        assert q == "E50", f"{call}: after the BYE, `{cmd}` answered {q!r}, not E50"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("to_caller", [True, False], ids=["stream2uac", "stream2uas"])
async def test_playback(media_stack, prompt, to_caller):
    with trio.fail_after(20):
        await run_playback(media_stack, prompt, to_caller)
