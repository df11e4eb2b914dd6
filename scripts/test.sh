#!/usr/bin/env bash
# The project's test command: set up (scripts/setup.sh), lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# One worker per core (pytest-xdist; tests/conftest.py gives each one thread): the suite is mostly
# single-threaded work, and two cores halve it. Pass -n 0 to run it in one process.
.venv/bin/python -m pytest -q -n auto "$@"
