#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (written for one H100/H200, under 8 minutes) that
# writes one results file:
#   1. the single-process tests on CUDA (MEGADUAL_TEST_DEVICE=cuda; tests/helpers.py reads it),
#      the Triton FP8 GEMM against the reference among them
#   2. 30 training steps in BF16 and in FP8 from one seed, and their loss gap
#   3. grouped against per-expert-loop routed experts: step time and losses
#   4. scripts/bench_fp8.py's table
#   5. the throughput line (--log-throughput) of a mid-size MoE, in BF16 and in FP8
#
#   bash scripts/gpu_check.sh [RESULTS]                 (default gpu_check_results.txt)
#   bash scripts/gpu_check.sh --cpu-dry-run [RESULTS]   tiny sizes on CPU, tests only collected:
#                                                       checks the script itself (tests/test_gpu_check.py)
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
    DEVICE=cpu; PYTEST_MODE=(--collect-only -q)
    LOSS_GAP=(--steps 2 --window 1 --hidden-size 128 --num-layers 2 --seq-length 32 --threads 1)
    BENCH_STEP=(--model tiny --iters 1); BENCH_FP8=(--device cpu --backends reference --tokens 128 --warmup 0 --iters 1)
    MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --num-experts 4
           --moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32 --vocab-size 512
           --micro-batch-size 2 --global-batch-size 4 --train-iters 2 --log-interval 1)
    FP8_MODEL=(--hidden-size 128 --moe-ffn-hidden-size 128 --moe-shared-expert-intermediate-size 128)
else
    DEVICE=cuda; PYTEST_MODE=(-q -rfs)
    LOSS_GAP=(--steps 30 --window 10 --hidden-size 512 --num-layers 4 --seq-length 512)
    BENCH_STEP=(--device cuda --iters 20); BENCH_FP8=()
    MODEL=(--num-layers 4 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --num-experts 16
           --moe-router-topk 4 --moe-ffn-hidden-size 1024 --moe-shared-expert-intermediate-size 1024
           --vocab-size 32000 --micro-batch-size 2 --global-batch-size 16 --train-iters 30 --log-interval 10)
    FP8_MODEL=()
fi
COMMON=(--mock-data --moe-first-k-dense 1 --lr 1e-4 --log-throughput)

step "device" python3 -c "import torch; print('torch', torch.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
step "single-process tests on $DEVICE (FP8 Triton GEMM against the reference included)" \
    env MEGADUAL_TEST_DEVICE=$DEVICE python3 -m pytest "${PYTEST_MODE[@]}" "${SINGLE_PROCESS_TESTS[@]}"
step "training steps, BF16 (CUDA's default; FP32 on CPU) and FP8, loss gap" \
    python3 scripts/fp8_loss_gap.py "${LOSS_GAP[@]}"
step "grouped against per-expert-loop routed experts" python3 scripts/bench_step.py "${BENCH_STEP[@]}"
step "FP8 GEMM table" python3 scripts/bench_fp8.py "${BENCH_FP8[@]}"
step "throughput line, BF16" python3 pretrain_moe.py "${COMMON[@]}" "${MODEL[@]}"
step "throughput line, FP8" python3 pretrain_moe.py "${COMMON[@]}" "${MODEL[@]}" "${FP8_MODEL[@]}" --fp8-format e4m3
echo "results in $RESULTS"
exit $FAILED
