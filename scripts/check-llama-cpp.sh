#!/usr/bin/env bash
# The GGUF export checked against llama.cpp itself: installs llama-cpp-python (it compiles llama.cpp from
# source, about 6 minutes on 2 cores the first time; pip caches the wheel afterwards) and runs the slow test
# that compares llama.cpp's greedy tokens and tokenization with ours on a tiny exported model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install "llama-cpp-python==0.3.36" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import llama_cpp" || { echo "llama-cpp-python did not install: the check cannot run" >&2; exit 1; }
exec .venv/bin/python -m pytest -m slow tests/test_export_gguf.py "$@"
