#!/usr/bin/env bash
# One command: set up, build a demo folder archive (a synthetic chest phantom with lesions,
# a lesion-free phantom, and the real LIDC-IDRI-0314 series where ../shared/data has it),
# screen it, and print the worklist and where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ctscreen demo --dir "${1:-demo}"
