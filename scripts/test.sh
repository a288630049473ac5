#!/usr/bin/env bash
# One command: set up (with the test tools), then lint, type-check and run every test (CI).
#   scripts/test.sh --quick    the quick tier: unit tests and one end-to-end run, under 3
#                              minutes on 2 cores (pytest -m "not slow and not heavy"); no
#                              setup, lint or type-check (run scripts/setup.sh --test once)
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow", scripts/test.sh --quick -x).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--quick" ]]; then
    shift
    exec .venv/bin/pytest -m "not slow and not heavy" "$@"
fi
bash scripts/setup.sh --test
.venv/bin/ruff check pipeline tests bench scripts
.venv/bin/mypy
.venv/bin/pytest "$@"
