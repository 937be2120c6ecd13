"""rtpproxy's error codes (the numbers after ``E`` in a reply).

The numbers are rtpproxy's own, because controllers log and sometimes act on
them; the names say where each one is produced.
"""

from __future__ import annotations

import enum


class ECode(enum.IntEnum):
    CMDUNKN = 0  # unknown command letter
    PARSE_NARGS = 1  # wrong number of arguments
    PARSE_MODS = 2  # modifiers on a command that takes none
    PARSE_SUBC = 3  # sub-command not allowed / does not parse
    PARSE_1 = 5  # general syntax error (empty, NUL, too many args)
    PARSE_2 = 6  # RP / Nax
    PARSE_3 = 7  # unknown R/C/N modifier
    PARSE_4 = 8  # unknown D modifier
    PARSE_5 = 9  # unknown G modifier
    PARSE_10 = 10  # bad %-encoding in a notify tag
    PARSE_11 = 11  # E without bridge mode
    PARSE_12 = 12  # I without bridge mode
    PARSE_13 = 13  # Z out of range
    PARSE_14 = 14  # bad codec list
    PARSE_15 = 15  # bad L<addr>
    PARSE_16 = 16  # bad R<addr>
    PARSE_6 = 17  # bad P count
    PARSE_7 = 18  # unknown I modifier
    PARSE_8 = 19  # unknown Q modifier
    RTOOBIG_1 = 25  # G reply too large
    RTOOBIG_2 = 26  # Q reply too large
    INVLARG_1 = 31  # L<addr>/L{label} not a local address
    INVLARG_2 = 32  # R<addr>: no local address towards it
    INVLARG_3 = 33
    INVLARG_4 = 34
    INVLARG_5 = 35  # unknown U/L modifier; P ... session without codecs
    INVLARG_6 = 36  # no local address of the family
    INVLARG_7 = 37  # address/port does not resolve numerically
    SESUNKN = 50  # session not found
    PLRFAIL = 60  # playback failed
    QRYFAIL = 62  # Q: unknown counter
    CPYFAIL = 65  # C: copy failed
    STSFAIL = 68  # G: unknown counter
    LSTFAIL_1 = 71  # no ports (existing session)
    LSTFAIL_2 = 72  # no ports (new session)
    NSOFF = 75  # notify arguments without -n
    NOMEM_1 = 81
    NOMEM_9 = 89
    OVERLOAD = 98
    SLOWSHTDN = 99  # draining after SIGHUP


class RtppError(Exception):
    """A command failed with rtpproxy error code ``code``."""

    def __init__(self, code: ECode | int, msg: str = "") -> None:
        super().__init__(msg or f"E{int(code)}")
        self.code = int(code)
        self.msg = msg

    def reply(self) -> str:
        return f"E{self.code}"
