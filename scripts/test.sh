#!/usr/bin/env bash
# The project's test command: set up (scripts/setup.sh), lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# One worker per core (pytest-xdist; tests/conftest.py gives each one thread): the suite is mostly
# single-threaded work: on 2 cores 5.5 minutes against 10.4 in one process (-n 0), 2026-12-01.
# At most 4: each worker holds its own torch, OpenVINO and compiled kernels in memory.
.venv/bin/python -m pytest -q -n auto --maxprocesses 4 "$@"
