"""Parsed control commands: frozen value objects, one class per operation.

They are built only by :func:`pyrtpproxy.parser.parse_command`; everything
that can be checked without touching the session table or the network
(argument counts, modifier grammar, E-codes of spec section 10 that depend
only on the text and on the configuration in :class:`ParseEnv`) has been
checked by then.

Strings (call-ids, tags, addresses) are ``str`` decoded from the wire bytes
as UTF-8 with ``surrogateescape``, so ``s.encode("utf-8", "surrogateescape")``
gives the original bytes back.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


@attrs.frozen
class ParseEnv:
    """What the parser needs to know about the configuration.

    ``bridge``: two interfaces (``-l in/out``), so I/E modifiers are allowed.
    ``has_ipv4`` / ``has_ipv6``: a bind address of that family exists
    (with no -l and no -6, IPv4 wildcard only).
    ``labels``: labels of extra bind addresses (``-l label@addr``).
    ``notify``: at least one ``-n`` was given.
    ``service``: resolves a UDP service name (``sip``) to its port, or
    None when there is no such service; the daemon passes the system's
    services database (this package does no I/O).  Without it only
    numeric ports are accepted.
    """

    bridge: bool = False
    has_ipv4: bool = True
    has_ipv6: bool = False
    labels: frozenset[str] = frozenset()
    notify: bool = False
    service: Callable[[str], int | None] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class ULMods:
    """Modifiers of U and L (spec section 3.3)."""

    asymmetric: bool | None = None  # True: A, False: S, None: not given
    weak: bool = False  # W
    ipv6: bool = False  # 6
    # I/E letters in the order given, as interface indices (I -> 0, E -> 1).
    # ifaces[0] is the interface this command's party faces, ifaces[1] the
    # other party's.  Empty when neither letter was given.
    ifaces: tuple[int, ...] = ()
    ptime: int | None = None  # Z<ms>, 1..999
    codecs: tuple[int, ...] | None = None  # c<pt,pt>
    codecs_text: str | None = None  # the codec list as written ("0,8,101")
    local_addr: str | None = None  # L<addr> (syntax checked, not resolved)
    local_label: str | None = None  # L{label} (known label)
    remote_addr: str | None = None  # R<addr> (syntax checked, not resolved)
    new_port: bool = False  # N


@attrs.frozen
class SubLookup:
    """``&& L addr port``: set up the answer leg in the same request."""

    addr: str
    port: str
    remote: tuple[str, int] | None  # numerically resolved, None on hold
    on_hold: bool = False
    mods: ULMods = ULMods()


@attrs.frozen
class SubDelete:
    """``&& D[w]``: delete after the main command."""

    weak: bool = False


@attrs.frozen
class SubSet:
    """``&& S[r] ttl=N`` / ``tos=N``."""

    reverse: bool = False
    ttl: int | None = None
    tos: int | None = None


@attrs.frozen
class SubCopy:
    """``&& C call-id from-tag to-tag``: fork both streams of that session
    into this one (20260309)."""

    call_id: str
    from_tag: str
    to_tag: str


SubCommand = SubLookup | SubDelete | SubSet | SubCopy


@attrs.frozen
class Version:
    """``V``."""


@attrs.frozen
class VersionFeature:
    """``VF <datecode>``."""

    datecode: str


@attrs.frozen
class Update:
    """``U`` (``lookup=False``) and ``L`` (``lookup=True``)."""

    lookup: bool
    call_id: str
    addr: str  # as written
    port: str  # as written
    from_tag: str
    to_tag: str | None
    mods: ULMods
    # addr:port resolved numerically (E37 otherwise).  None when the address
    # is null (on hold) or when the address string fails the length check
    # (silently not used, spec 3.3).
    remote: tuple[str, int] | None
    on_hold: bool = False
    notify_socket: str | None = None  # as written (7/8-argument U)
    notify_tag: str | None = None  # URL-decoded
    subcommands: tuple[SubCommand, ...] = ()


@attrs.frozen
class Delete:
    """``D[w] call-id from-tag [to-tag]``."""

    call_id: str
    from_tag: str
    to_tag: str | None = None
    weak: bool = False


@attrs.frozen
class DeleteAll:
    """``X``."""


@attrs.frozen
class Info:
    """``I[b][l]``."""

    brief: bool = False
    load: bool = False


@attrs.frozen
class Stats:
    """``G[v] [name ...]``; names are checked against the counter table."""

    verbose: bool = False
    names: tuple[str, ...] = ()


@attrs.frozen
class Query:
    """``Q[v] call-id from-tag [to-tag [counter ...]]``."""

    call_id: str
    from_tag: str
    to_tag: str | None = None
    verbose: bool = False
    names: tuple[str, ...] = ()  # checked against the Q counter names
    subcommands: tuple[SubCommand, ...] = ()
    # E19/E62 are reported only once the session was found (rtpproxy's order)
    deferred_error: int | None = None


@attrs.frozen
class Record:
    """``R[s] call-id from-tag [to-tag]``."""

    call_id: str
    from_tag: str
    to_tag: str | None = None
    single: bool = False


@attrs.frozen
class Copy:
    """``C[s][p] call-id target from-tag [to-tag]``."""

    call_id: str
    target: str
    from_tag: str
    to_tag: str | None = None
    single: bool = False
    reply_port: bool = False


@attrs.frozen
class NoRecord:
    """``N[a] call-id from-tag [to-tag]``."""

    call_id: str
    from_tag: str
    to_tag: str | None = None
    all: bool = False


@attrs.frozen
class Play:
    """``P[count] call-id prompt codecs from-tag [to-tag]``."""

    call_id: str
    prompt: str
    codecs: str  # "session" or a comma-separated list, as written
    from_tag: str
    to_tag: str | None = None
    count: int = 1  # -1 loops, 0 stops


@attrs.frozen
class StopPlay:
    """``S call-id from-tag [to-tag]``."""

    call_id: str
    from_tag: str
    to_tag: str | None = None


Command = (
    Version
    | VersionFeature
    | Update
    | Delete
    | DeleteAll
    | Info
    | Stats
    | Query
    | Record
    | Copy
    | NoRecord
    | Play
    | StopPlay
)
