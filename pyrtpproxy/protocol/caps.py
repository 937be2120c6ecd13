"""The capability table: one list drives both ``VF <datecode>`` and ``-v``.

Every datecode rtpproxy 3.2 knows is listed, in its order, with a short
description.  ``IMPLEMENTED`` says which of them this implementation really
provides; ``VF`` answers 1 only for those.  When a feature lands, add its
code to ``IMPLEMENTED`` (and nowhere else).
"""

from __future__ import annotations

import attrs

BASE_VERSION = "20040107"

# Only 20081224 (timeout notifications) depends on -n, as in rtpproxy.
_NEEDS_NOTIFY = frozenset({"20081224"})

IMPLEMENTED: frozenset[str] = frozenset(
    {
        "20040107",
        "20050322",  # Kamailio refuses the proxy without it
        "20060704",
        "20071116",  # Z (re-packetisation)
        "20071218",  # C (copy to a file or to udp:host:port)
        "20080403",
        "20081102",
        "20081224",  # timeout notifications (only answered 1 with -n)
        "20090810",
        "20140323",
        "20140617",  # claimed as rtpproxy claims it (it enables nothing else)
        "20141004",
        "20150330",
        "20150420",  # sequence tracking, rtpa_* counters, named Q counters
        "20150617",  # %%CC_SELF%% notify targets (answered 1 with or without -n)
        "20191015",
        "20200226",  # N (stop recording)
        "20230205",  # rtpa_nlost
        "20230314",
        "20230424",  # longest_ipi, rtpa_jlast, rtpa_jmax, rtpa_javg
        "20250523",  # Cp (reply with the copy's local port)
        "20251015",
        "20260306",
        "20260308",
        "20260309",  # U ... && C (forking another session's streams)
    }
)

# (code, description) in protocol order; descriptions are our own wording.
_TABLE: tuple[tuple[str, str], ...] = (
    ("20040107", "Base control protocol"),
    ("20050322", "Several media streams per call (;N media numbers) and music on hold"),
    ("20060704", "Extra argument accepted by the V command"),
    ("20071116", "RTP re-packetisation to a requested ptime (Z modifier)"),
    ("20071218", "Copying (forking) a media stream (C command)"),
    ("20080403", "Per-session statistics query (Q command)"),
    ("20081102", "Codec list in update/lookup (c modifier)"),
    ("20081224", "Session timeout notifications"),
    ("20090810", "Automatic bridging between two interfaces (I/E modifiers)"),
    ("20140323", "Load tracking and reporting"),
    ("20140617", "Anchoring of the session connect time"),
    ("20141004", "Named global performance counters (G command)"),
    ("20150330", "Allocation of a fresh port on update/lookup (N modifier)"),
    ("20150420", "RTP sequence tracking, rtpa_* counters and named Q counters"),
    ("20150617", "Controller's own address (%%CC_SELF%%) as a notification target"),
    ("20191015", "Sub-commands introduced by &&"),
    ("20200226", "Stopping a recording (N command)"),
    ("20230205", "Lost-packet counter rtpa_nlost"),
    ("20230314", "Combining Q with a following delete (Q ... && D)"),
    ("20230424", "Counters longest_ipi, rtpa_jlast, rtpa_jmax and rtpa_javg"),
    ("20250523", "Reply with the local source port of a UDP copy (C with p)"),
    ("20251015", "Per-stream TTL and IP ToS via the S sub-command"),
    ("20260306", "Bind address selection by label (l{label} in U/L)"),
    ("20260308", "Both legs in one request (U ... && L ...)"),
    ("20260309", "Forking both streams with a C sub-command"),
)


@attrs.frozen
class Capability:
    code: str
    description: str
    implemented: bool


CAPS: tuple[Capability, ...] = tuple(Capability(code, descr, code in IMPLEMENTED) for code, descr in _TABLE)

_BY_CODE: dict[str, Capability] = {c.code: c for c in CAPS}


def supports(code: str, *, notify: bool) -> bool:
    """The ``VF <code>`` answer: known, implemented, and (for the
    notification codes) only when notifications are configured."""
    if code not in _BY_CODE or code not in IMPLEMENTED:
        return False
    if code in _NEEDS_NOTIFY and not notify:
        return False
    return True


def version_listing() -> str:
    """The text ``rtpproxy -v`` prints: every code we know of."""
    lines = [f"Basic version: {BASE_VERSION}\n"]
    lines.extend(f"Extension {c.code}: {c.description}\n" for c in CAPS)
    return "".join(lines)
