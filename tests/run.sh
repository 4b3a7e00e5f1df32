#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite (as root: the
# capture tests load BPF programs and create network namespaces).
# usage: sudo bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps test
exec /usr/bin/python3 -m pytest -v -ra "$@" tests
