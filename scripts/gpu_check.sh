#!/usr/bin/env bash
# kdforge GPU check: everything the project wants to know from one GPU, in at most 8 minutes, as one report.
#
#   bash scripts/gpu_check.sh --prepare          # HERE, before the GPU session: copy the data into .data/ (git-ignored)
#   bash scripts/gpu_check.sh [OUT_DIR]          # on the GPU machine, at the repository root (default OUT_DIR docs/bench)
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]  # on any CPU: every command parses and starts, at tiny size
#
# Writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json (updated after every step and every bench row, so a step cut
# short by its timeout keeps what was measured before it), plus OUT_DIR/gpu_check_cuda_tests.txt (pytest output) and
# OUT_DIR/gpu_check_runs/ (the two training runs). Steps and their time limits (sum 460 s; with the kill grace and bookkeeping under 480 s):
#   1. environment: device name, torch/CUDA versions                                     20 s
#   2. the `cuda` tests: pytest -m cuda tests/test_cuda.py                              120 s
#   3. bench table: kd and atf, resnet32x4→resnet8x4 at batch 256 and 64, resnet56→resnet20 at batch 256, each with
#      bf16/channels_last/compile all on, each one off, all off, ratio against the reference loop, TFLOP/s and the
#      fraction of the device's dense bf16 peak; rows run most wanted first (bench_plan), skipped once spent 170 s
#   4. full CIFAR-10: resnet20 teacher (10 epochs), then KD into resnet8 (10 epochs), each timed end to end    150 s
#
# Needs on the GPU machine: bash, coreutils `timeout`, Python 3.10+ with torch (CUDA build), numpy, pyyaml, pillow and
# tqdm (kdforge's runtime imports; matplotlib is not needed), pytest for step 2 (skipped with a note if missing).
# kdforge itself is NOT installed: it runs from this checkout through PYTHONPATH (no pip, no network).
# Data: .data/cifar10_jpeg.npz (18 MB), copied here by --prepare from ../shared/data/cifar10/; name `.data` in the
# device tool's `carry` so it travels with the working tree. The bench uses the embedded CIFAR-10 subset (in the
# package); only step 4 needs .data/.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
if [ "${1:-}" = "--prepare" ]; then
    src="${2:-../shared/data/cifar10/cifar10_jpeg.npz}"
    [ -f "$src" ] || { echo "gpu_check: $src not found; pass the JPEG npz path: --prepare PATH" >&2; exit 2; }
    mkdir -p .data && cp "$src" .data/cifar10_jpeg.npz && echo "copied $src to .data/cifar10_jpeg.npz"
    exit 0
fi
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-docs/bench}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DRYFLAG=""
SCALE=1  # the dry run checks that commands start, not their speed: its limits are 5x (a loaded CPU is slow)
[ "$DRY" = 1 ] && DRYFLAG="--dry-run" && SCALE=5
rm -f "$OUT/gpu_check.json"
T0=$(date +%s)

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "numpy", "yaml", "PIL", "tqdm") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (kdforge needs torch numpy pyyaml pillow tqdm)" >&2
    exit 3
fi

# step NAME LIMIT_S COMMAND...: run it under `timeout`, record exit code and seconds in the report.
step() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s elapsed)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    "$PY" scripts/gpu_check.py step "$OUT" --name "$name" --rc "$rc" --seconds "$(( $(date +%s) - start ))"
    return 0
}

step "1 environment" $((20 * SCALE)) "$PY" scripts/gpu_check.py env "$OUT" $DRYFLAG

tests_start=$(date +%s)
if "$PY" -c "import pytest" 2>/dev/null; then
    if [ "$DRY" = 1 ]; then
        # Collection only: every cuda test is found and imports; without a GPU each is reported skipped.
        timeout 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda tests/test_cuda.py \
            > "$OUT/gpu_check_cuda_tests.txt" 2>&1
    else
        timeout --kill-after=10 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rfEs tests/test_cuda.py \
            > "$OUT/gpu_check_cuda_tests.txt" 2>&1
    fi
    rc=$?
else
    echo "pytest is not installed: the cuda tests were not run" > "$OUT/gpu_check_cuda_tests.txt"
    rc=127
fi
"$PY" scripts/gpu_check.py tests "$OUT" --log "$OUT/gpu_check_cuda_tests.txt" --rc "$rc" \
    --seconds "$(( $(date +%s) - tests_start ))"
"$PY" scripts/gpu_check.py step "$OUT" --name "2 cuda tests" --rc "$rc" --seconds "$(( $(date +%s) - tests_start ))"

# The bench stops starting rows 10 s before its limit; `timeout` is the hard stop.
step "3 bench" $((170 * SCALE)) "$PY" scripts/gpu_check.py bench "$OUT" --budget $((160 * SCALE)) $DRYFLAG
step "4 full CIFAR-10 training" $((150 * SCALE)) "$PY" scripts/gpu_check.py train "$OUT" --budget $((145 * SCALE)) $DRYFLAG

"$PY" scripts/gpu_check.py render "$OUT"
echo "gpu_check: done in $(( $(date +%s) - T0 ))s; report $OUT/gpu_check.md"
