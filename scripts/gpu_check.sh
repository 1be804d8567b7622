#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (written for one H100/H200, under 8 minutes) that
# writes one results file:
#   1. the single-process tests on CUDA (MEGADUAL_TEST_DEVICE=cuda; tests/helpers.py reads it),
#      the Triton FP8 GEMM against the reference among them
#   2. 30 training steps in BF16 and in FP8 from one seed, their loss gap, and each run's log line
#      with its throughput (--log-throughput, TFLOP/s per GPU)
#   3. grouped against per-expert-loop routed experts: step time and losses (scripts/bench_step.py)
#   4. scripts/bench_fp8.py's table
#
#   bash scripts/gpu_check.sh [RESULTS]                 (default gpu_check_results.txt)
#   bash scripts/gpu_check.sh --cpu-dry-run [RESULTS]   tiny sizes on CPU, the test files only listed:
#                                                       checks the script (tests/test_gpu_check.py)
# Every step runs even when one before it failed; each ends with its exit status in the file,
# and the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --cpu-dry-run ]; then DRY=1; shift; fi
RESULTS=${1:-gpu_check_results.txt}
: > "$RESULTS"
FAILED=0

step() {  # step TITLE COMMAND...: run COMMAND, its output and exit status into the results file
    local title=$1; shift
    echo "== $title ==" | tee -a "$RESULTS"
    "$@" 2>&1 | tee -a "$RESULTS"
    local status=${PIPESTATUS[0]}
    echo "== exit status $status: $title ==" | tee -a "$RESULTS"
    [ "$status" -eq 0 ] || FAILED=1
}

SINGLE_PROCESS_TESTS=(tests/test_model.py tests/test_mla.py tests/test_router.py tests/test_wgrad.py
    tests/test_dropout.py tests/test_fp8_quant.py tests/test_fp8_gemm.py tests/test_fp8_linear.py
    tests/test_fp8_training.py tests/test_training.py tests/test_flops.py tests/test_cross_entropy.py
    tests/test_grouped_gemm.py)
if [ "$DRY" = 1 ]; then
    TESTS=(ls "${SINGLE_PROCESS_TESTS[@]}")
    LOSS_GAP=(--steps 2 --window 1 --hidden-size 128 --num-layers 2 --seq-length 32 --threads 1)
    BENCH_STEP=(--model tiny --iters 1)
    BENCH_FP8=(--device cpu --backends reference --tokens 128 --warmup 0 --iters 1)
else
    TESTS=(env MEGADUAL_TEST_DEVICE=cuda python3 -m pytest -q -rfs "${SINGLE_PROCESS_TESTS[@]}")
    LOSS_GAP=(--steps 30 --window 10 --hidden-size 1024 --num-layers 4 --seq-length 1024)
    BENCH_STEP=(--device cuda --iters 20)
    BENCH_FP8=()
fi

step "single-process tests on CUDA (the Triton FP8 GEMM against the reference among them)" "${TESTS[@]}"
step "training steps: BF16 (fp32 below: CUDA's default precision) and FP8, loss gap, throughput" \
    python3 scripts/fp8_loss_gap.py --log-throughput "${LOSS_GAP[@]}"
step "grouped against per-expert-loop routed experts" python3 scripts/bench_step.py "${BENCH_STEP[@]}"
step "FP8 GEMM table" python3 scripts/bench_fp8.py "${BENCH_FP8[@]}"
echo "results in $RESULTS"
exit $FAILED
