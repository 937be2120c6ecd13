"""The one counter table: G, I, Q and the metrics listener all read it.

Counters are plain integer attributes on :class:`Counters` (one instance per
process, written by the control plane); the media engine keeps its own
per-stream integers and adds them into the totals it reports through
``MediaEngine.totals()``.  Nothing here does I/O.
"""

from __future__ import annotations

import attrs

from ..protocol.counters import GLOBAL_COUNTERS, QUERY_COUNTERS, QUERY_DEFAULT, QUERY_MAX_NAMES

__all__ = [
    "GLOBAL_COUNTERS",
    "QUERY_COUNTERS",
    "QUERY_DEFAULT",
    "QUERY_MAX_NAMES",
    "Counters",
    "format_value",
]


def format_value(kind: str, value: float | int) -> str:
    if kind == "double":
        return "%f" % float(value)
    return str(int(value))


@attrs.define(eq=False)
class Counters:
    """Control-plane counters (the media engine's are added on read)."""

    nsess_created: int = 0
    nsess_destroyed: int = 0
    nsess_timeout: int = 0
    nsess_complete: int = 0
    nsess_nortp: int = 0
    nsess_owrtp: int = 0
    nsess_nortcp: int = 0
    nsess_owrtcp: int = 0
    nplrs_created: int = 0
    nplrs_destroyed: int = 0
    npkts_played: int = 0
    total_duration: float = 0.0
    ncmds_rcvd: int = 0
    ncmds_rcvd_ndups: int = 0
    ncmds_succd: int = 0
    ncmds_errs: int = 0
    ncmds_repld: int = 0
    # Summed from each analysed RTP stream when its session ends (rtpproxy's rule).
    rtpa_nsent: int = 0
    rtpa_nrcvd: int = 0
    rtpa_ndups: int = 0
    rtpa_nlost: int = 0
    rtpa_perrs: int = 0
    pyrtpp_ncmds_denied: int = 0  # --control-allow refusals (datagrams or connections)
