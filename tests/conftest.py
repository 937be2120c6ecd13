"""Test-suite set-up: tests/ (with relayutil.py) is on sys.path for every test module."""
