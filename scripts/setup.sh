#!/usr/bin/env bash
# Create .venv (if needed) and install elmtune into it, torch first so pip keeps the build chosen here.
# Set ELMTUNE_TORCH to pick another torch requirement (e.g. a CUDA build); the default is the CPU build
# that this project's machines keep on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# pip's own exit status counts (pipefail); only the filter's "nothing left to print" is forgiven
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip install "${ELMTUNE_TORCH:-torch==2.13.0}"
pip install -e ".[test]"
.venv/bin/python -c "import elmtune, torch; print(f'elmtune {elmtune.__version__} ready (torch {torch.__version__})')"
