"""The counter names G and Q accept, their kinds and descriptions: part of the
control language (the parser validates names against them; sessions/stats.py
keeps the values)."""

from __future__ import annotations

# name -> (kind, description); the order is rtpproxy's G order.
GLOBAL_COUNTERS: dict[str, tuple[str, str]] = {
    "nsess_created": ("int", "Number of RTP sessions created"),
    "nsess_destroyed": ("int", "Number of RTP sessions destroyed"),
    "nsess_timeout": ("int", "Number of RTP sessions ended due to media timeout"),
    "nsess_complete": ("int", "Number of RTP sessions fully setup"),
    "nsess_nortp": ("int", "Number of sessions that had no RTP neither in nor out"),
    "nsess_owrtp": ("int", "Number of sessions that had one-way RTP only"),
    "nsess_nortcp": ("int", "Number of sessions that had no RTCP neither in nor out"),
    "nsess_owrtcp": ("int", "Number of sessions that had one-way RTCP only"),
    "nplrs_created": ("int", "Number of RTP players created"),
    "nplrs_destroyed": ("int", "Number of RTP players destroyed"),
    "npkts_rcvd": ("int", "Total number of RTP/RTPC packets received"),
    "npkts_played": ("int", "Total number of RTP packets originated by players"),
    "npkts_relayed": ("int", "Total number of RTP/RTPC packets relayed"),
    "npkts_resizer_in": ("int", "Total number of RTP packets sent to the resizer"),
    "npkts_resizer_out": ("int", "Total number of RTP packets received from the resizer"),
    "npkts_resizer_discard": ("int", "Total number of RTP packets discarded by the resizer"),
    "npkts_discard": ("int", "Total number of RTP/RTPC packets discarded"),
    "total_duration": ("double", "Cumulative duration of all sessions"),
    "ncmds_rcvd": ("int", "Total number of control commands received"),
    "ncmds_rcvd_ndups": ("int", "Total number of duplicate control commands received"),
    "ncmds_succd": ("int", "Total number of control commands successfully processed"),
    "ncmds_errs": ("int", "Total number of control commands ended up with an error"),
    "ncmds_repld": ("int", "Total number of control commands that had a reply generated"),
    "rtpa_nsent": ("int", "Total number of uniqie RTP packets sent to us based on SEQ tracking"),
    "rtpa_nrcvd": ("int", "Total number of unique RTP packets received by us based on SEQ tracking"),
    "rtpa_ndups": ("int", "Total number of duplicate RTP packets received by us based on SEQ tracking"),
    "rtpa_nlost": ("int", "Total number of lost RTP packets based on SEQ tracking"),
    "rtpa_perrs": ("int", "Total number of RTP packets that failed RTP parse"),
    "pps_in": ("double", "Rate at which RTP/RTPC packets are received (packets per second)"),
    # pyrtpproxy's own (the pyrtpp_ prefix keeps them apart from rtpproxy's names)
    "pyrtpp_npkts_foreign": (
        "int",
        "Total number of RTP/RTCP packets dropped because their source is not the stream's (latch rules)",
    ),
    "pyrtpp_ncmds_denied": (
        "int",
        "Total number of control commands (UDP) or connections (TCP) refused by --control-allow",
    ),
}

# Q: name -> kind; the first five are the default reply.
QUERY_COUNTERS: dict[str, str] = {
    "ttl": "int",
    "npkts_ina": "int",
    "npkts_ino": "int",
    "nrelayed": "int",
    "ndropped": "int",
    "rtpa_nsent": "int",
    "rtpa_nrcvd": "int",
    "rtpa_ndups": "int",
    "rtpa_nlost": "int",
    "rtpa_perrs": "int",
    "longest_ipi": "double",
    "rtpa_jlast": "double",
    "rtpa_jmax": "double",
    "rtpa_javg": "double",
}
QUERY_DEFAULT = ("ttl", "npkts_ina", "npkts_ino", "nrelayed", "ndropped")
QUERY_MAX_NAMES = 11
