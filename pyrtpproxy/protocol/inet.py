"""Numeric address text <-> packed bytes, as glibc's inet_pton/inet_ntop do it,
without the socket module (the pure packages stay free of I/O modules)."""

from __future__ import annotations

import ipaddress

AF_INET = 2  # Linux's values: recording formats store them
AF_INET6 = 10


def pton4(text: str) -> bytes:
    """Dotted quad -> 4 bytes; ValueError for anything inet_pton rejects."""
    return ipaddress.IPv4Address(text).packed


def pton6(text: str) -> bytes:
    """IPv6 text (no scope) -> 16 bytes; ValueError for anything inet_pton rejects."""
    if "%" in text:
        raise ValueError(text)
    return ipaddress.IPv6Address(text).packed


def ntop4(packed: bytes) -> str:
    return "%d.%d.%d.%d" % tuple(packed[:4])


def ntop6(packed: bytes) -> str:
    """glibc's inet_ntop(AF_INET6): the longest run (>= 2) of zero words
    compressed, leftmost on ties; ::a.b.c.d and ::ffff:a.b.c.d in dotted form."""
    words = [packed[i] << 8 | packed[i + 1] for i in range(0, 16, 2)]
    best_base, best_len, cur_base, cur_len = -1, 0, -1, 0
    for i, w in enumerate(words):
        if w == 0:
            if cur_base < 0:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
            if cur_len > best_len:
                best_base, best_len = cur_base, cur_len
        else:
            cur_base, cur_len = -1, 0
    if best_len < 2:
        best_base = -1
    out: list[str] = []
    for i in range(8):
        if best_base >= 0 and best_base <= i < best_base + best_len:
            if i == best_base:
                out.append(":")
            continue
        if i != 0:
            out.append(":")
        if i == 6 and best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
            out.append(ntop4(packed[12:16]))
            break
        out.append("%x" % words[i])
    if best_base >= 0 and best_base + best_len == 8:
        out.append(":")
    return "".join(out)


def pton(text: str) -> tuple[int, bytes]:
    """'127.0.0.1' -> (AF_INET, 4 bytes); '::1' (scope ignored) -> (AF_INET6, 16 bytes)."""
    if ":" in text:
        return AF_INET6, pton6(text.partition("%")[0])
    return AF_INET, pton4(text)


def ntop(family: int, packed: bytes) -> str:
    return ntop6(packed) if family == AF_INET6 else ntop4(packed)
