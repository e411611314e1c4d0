#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded default, `elmtune demo`; extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/elmtune demo "$@"
