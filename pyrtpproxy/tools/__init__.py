"""Operator commands beside the relay: pyrtpproxy-extract and pyrtpproxy-makeann."""
