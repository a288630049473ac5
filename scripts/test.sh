#!/usr/bin/env bash
# One command: set up (with the test tools), then lint, type-check and run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check pipeline tests bench scripts
.venv/bin/mypy
.venv/bin/pytest "$@"
