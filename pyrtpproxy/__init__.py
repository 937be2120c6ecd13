"""pyrtpproxy: a drop-in replacement for rtpproxy, in Python on Trio."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("pyrtpproxy")
except Exception:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"
