#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite (as root: the
# capture tests load BPF programs and create network namespaces), with the
# python of picosnitch's own environment (/opt/picosnitch, made by
# .ci/install-deps): the system's python, with Dash and the SQL clients.
# usage: sudo bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps test
exec /opt/picosnitch/bin/python3 -m pytest -v -ra "$@" tests
