# pyrtpproxy developer targets.
#
#   make run         start the relay in the foreground on loopback
#                    (make run ARGS="..." to pass other options)
#   make test        unit tests + Kamailio compat tests. On a fresh Debian 12
#                    run as root, it installs what the tests need
#                    (kamailio, sip-tester, tshark, mandoc, nftables,
#                    libnftables1, iproute2, redis-server) with apt-get.
#   make check       layering contracts, ruff lint/format, mypy (part of test)
#   make lint-man    check the man page with mandoc
#
# The virtualenv is $(VENV); it is created, and the package installed in it
# (editable, with the test extras), the first time, or when pyproject.toml
# changes.

SHELL := /bin/bash
.NOTPARALLEL:

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.pyrtpproxy-installed

ARGS ?= -f -F -s udp:127.0.0.1:22222 -l 127.0.0.1 -m 35000 -M 35999
PYTEST_ARGS ?= -q
# Seconds: a hung test run is killed well before the 15-minute CI budget.
TEST_TIMEOUT ?= 840

APT_PACKAGES := kamailio sip-tester tshark mandoc nftables libnftables1 iproute2 redis-server netbase
KAMAILIO_RTPPROXY_SO ?= /usr/lib/x86_64-linux-gnu/kamailio/modules/rtpproxy.so

.PHONY: help run test check test-deps venv-deps lint-man

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

run: $(STAMP)
	$(VENV)/bin/pyrtpproxy $(ARGS)

test: test-deps $(STAMP) check
	timeout -k 30 $(TEST_TIMEOUT) $(VPY) -m pytest tests compat-tests $(PYTEST_ARGS)

# The tree's rules: layering contracts (pyproject.toml [tool.importlinter]),
# lint and formatting (ruff), types of the pure packages (mypy).
check: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .
	$(VENV)/bin/mypy --no-incremental

lint-man:
	mandoc -Tlint man/rtpproxy.8

# --- the virtualenv -----------------------------------------------------------

$(VPY): | venv-deps
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VENV)/bin/pip install -e '.[test,bench]'
	@touch $@

# --- system packages (installed only when running as root, with apt-get) ------

# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip).
define need_python
  if [ ! -x $(VPY) ] && ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
    pkgs="$$pkgs python3 python3-venv"; missing="$$missing python3-venv"; \
  fi;
endef

define apt_install
  if [ -z "$$pkgs" ]; then exit 0; fi; \
  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
    echo "make: missing:$$missing (not root or no apt-get: not installing$$pkgs)" >&2; exit 0; \
  fi; \
  echo "make: missing:$$missing; installing$$pkgs" >&2; \
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$pkgs
endef

venv-deps:
	@pkgs=; missing=; \
	$(need_python) \
	$(apt_install)

test-deps:
	@pkgs=; missing=; \
	for c in kamailio sipp tshark mandoc nft ip redis-server; do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; \
	done; \
	[ -e $(KAMAILIO_RTPPROXY_SO) ] || missing="$$missing $(KAMAILIO_RTPPROXY_SO)"; \
	/sbin/ldconfig -p 2>/dev/null | grep -q libnftables.so.1 || missing="$$missing libnftables.so.1"; \
	[ -e /etc/services ] || missing="$$missing /etc/services"; \
	if [ -n "$$missing" ]; then pkgs=" $(APT_PACKAGES)"; fi; \
	$(need_python) \
	$(apt_install)
