#!/usr/bin/env bash
# One-shot check of elmtune's GPU path: the `gpu` tests, `bench train` on openelm-3b (with MFU) and
# `bench generate`, then a summary. Aimed at under 8 minutes on one H200 (an estimate: not yet run on a GPU; the step limits total 17 min).
#
#   bash scripts/gpu-check.sh --prepare   # here, online: wheels for an offline GPU host + the data it needs
#   bash scripts/gpu-check.sh             # on the GPU host (CUDA torch already installed there)
#   bash scripts/gpu-check.sh --dry-run   # anywhere: print the plan; check its commands parse and the GPU
#                                         # tests are collected (nothing runs on a GPU)
#
# On the GPU host, Python is the first of: $PYTHON, .venv/bin/python, python3 — it must already have a CUDA
# build of torch. Packages elmtune needs that it lacks (or has too old) come from wheels in .whl/ when present
# (offline hosts: `--prepare` downloads them for Python $WHEEL_PYTHON, default 3.12, manylinux x86_64);
# otherwise `pip install -e .[test]` is tried. The bench reads the Llama-2 tokenizer and alpaca-chinese data
# from $ELMTUNE_SHARED (default ../shared; `--prepare` copies what it needs to .gpu-shared/).
# Each step has a time limit; a failing step is reported and the next one still runs; the exit code is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run
for arg in "$@"; do
    case "$arg" in
        --prepare) MODE=prepare ;;
        --dry-run) MODE=dry-run ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

# Packages the GPU image lacks or has too old, pinned to the versions this checkout was tested with.
WHEELS=(transformers tokenizers huggingface-hub peft datasets dill multiprocess fastapi starlette annotated-doc
        pydantic pydantic-core annotated-types typing-inspection uvicorn openai jiter distro sniffio gguf trl)
# Optional, fetched at their newest release only when named in $GPU_CHECK_EXTRAS (e.g. "bitsandbytes": QLoRA's
# test skips without it; its wheel alone is ~43 MB, which a size-limited transfer to the GPU host may not take).
read -r -a OPTIONAL_WHEELS <<< "${GPU_CHECK_EXTRAS:-}"
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
SITE=/tmp/elmtune-gpu-site
MODEL=${GPU_CHECK_MODEL:-openelm-3b}
TESTS=$(find tests -name 'test_gpu*.py' | sort | tr '\n' ' ')
BENCH_TRAIN=(bench train --model "$MODEL" --steps 3 --batch-size 8 --grad-accum 2 --precision bf16 --device cuda
             --paths tutorial --paths elmtune --paths "elmtune + ckpt")
BENCH_GENERATE=(bench generate --model "$MODEL" --new-tokens 64 --dtype auto --device cuda)

if [ "$MODE" = prepare ]; then
    PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    mkdir -p .whl .gpu-shared/data/alpaca-chinese
    "$PY" -c "import importlib.metadata as m; m.version('elmtune')" 2>/dev/null \
        || { echo "gpu-check --prepare: elmtune is not installed here; run scripts/setup.sh first" >&2; exit 1; }
    for name in "${WHEELS[@]}"; do
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null) \
            || { echo "gpu-check --prepare: $name is not installed here (not needed by these versions): skipped"; continue; }
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
            "${PLATFORMS[@]}" -d .whl "$name==$version" || exit 1
    done
    for name in "${OPTIONAL_WHEELS[@]+"${OPTIONAL_WHEELS[@]}"}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
            "${PLATFORMS[@]}" -d .whl "$name" || echo "gpu-check --prepare: no wheel for $name (its tests will skip)"
    done
    shared=${ELMTUNE_SHARED:-../shared}
    cp -r "$shared/data/llama2-tokenizer" .gpu-shared/data/ || exit 1
    cp "$shared/data/alpaca-chinese/alpaca_chinese_part_0.json" .gpu-shared/data/alpaca-chinese/ || exit 1
    echo "prepared: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)), data in .gpu-shared/ ($(du -sh .gpu-shared | cut -f1))"
    echo "on the GPU host, with both folders beside the checkout's files: ELMTUNE_SHARED=.gpu-shared bash scripts/gpu-check.sh"
    exit 0
fi

# --- which Python, and what it needs ---------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export ELMTUNE_SHARED=${ELMTUNE_SHARED:-$([ -d .gpu-shared ] && echo "$PWD/.gpu-shared" || echo "$PWD/../shared")}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

install() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            && export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        "$PY" -m pip install -q -e ".[test]"
    fi
}

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note the outcome
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    local outcome="ok"
    [ $rc -eq 124 ] && outcome="TIMED OUT" || { [ $rc -ne 0 ] && outcome="FAILED (exit $rc)"; }
    [ "$outcome" = ok ] || FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-16s %-18s %4ss' "$name" "$outcome" $((SECONDS - start)))")
}

if [ "$MODE" = dry-run ]; then
    echo "gpu-check plan (dry run: nothing runs on a GPU)"
    echo "  python:        $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'))"
    echo "  install:       $(compgen -G '.whl/*.whl' >/dev/null && echo "$(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE" || echo "pip install -e .[test]")"
    echo "  data:          ELMTUNE_SHARED=$ELMTUNE_SHARED"
    echo "  1. $PY -m pytest -m gpu -q -rs $TESTS"
    echo "  2. $PY -m elmtune.cli ${BENCH_TRAIN[*]}"
    echo "  3. $PY -m elmtune.cli ${BENCH_GENERATE[*]}"
    # The plan's commands must parse, and the GPU tests must be there to run.
    step "bench arguments" 60 "$PY" -c "
import sys
from elmtune.cli import build_parser
for argv in (sys.argv[1:sys.argv.index('--')], sys.argv[sys.argv.index('--') + 1:]):
    build_parser().parse_args(argv)
print('bench commands parse')" "${BENCH_TRAIN[@]}" -- "${BENCH_GENERATE[@]}"
    # shellcheck disable=SC2086
    step "gpu tests found" 120 "$PY" -m pytest -m gpu --collect-only -q $TESTS
else
    step "install" 300 install
    step "cuda" 60 "$PY" -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA GPU'
print(torch.__version__, torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
    # shellcheck disable=SC2086
    step "pytest -m gpu" 240 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $TESTS
    step "bench train" 300 "$PY" -m elmtune.cli "${BENCH_TRAIN[@]}"
    step "bench generate" 120 "$PY" -m elmtune.cli "${BENCH_GENERATE[@]}"
fi

echo; echo "=== gpu-check summary ($MODE)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
