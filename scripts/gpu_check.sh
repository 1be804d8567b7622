#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (written for one H100/H200, under 10 minutes) that
# writes one results file, headed by the device and the torch, CUDA and NCCL versions:
#   1. the single-process tests on CUDA (MEGADUAL_TEST_DEVICE=cuda; every listed file takes its device
#      from tests/helpers.py's device_under_test(), which tests/test_gpu_check.py checks), the Triton
#      FP8 GEMM against the reference among them
#   2. the multi-process layouts (TP2+SP x EP2, hierarchical EP4 over 2 nodes, PP2 DualPipe x EP2;
#      evaluation; the plain and the distributed optimizer), 2-4 ranks on the one GPU under
#      --distributed-backend cuda:gloo (NCCL's device contract: a CPU tensor reaching a step
#      collective fails), each against one process, with MEGADUAL_DEVICE_CHECK on
#   3. one process under NCCL: host transfers per step and CUDA synchronizations
#      (torch.cuda.set_sync_debug_mode), the measured memory next to the planner's prediction
#   4. 30 training steps in BF16 and in FP8 from one seed, their loss gap, and each run's log line
#      with its throughput (--log-throughput, TFLOP/s per GPU)
#   5. grouped against per-expert-loop routed experts: step time and losses (scripts/bench_step.py)
#   6. scripts/bench_fp8.py's table (each FP8 backend listed after a tiny GEMM ran on it)
#
#   bash scripts/gpu_check.sh [RESULTS]                 (default gpu_check_results.txt)
#   bash scripts/gpu_check.sh --cpu-dry-run [RESULTS]   the same commands on CPU at tiny sizes (gloo,
#                                                       fewer layouts and tests): checks the script
#                                                       (tests/test_gpu_check.py)
# Every step runs even when one before it failed; each ends with its exit status in the file,
# and the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --cpu-dry-run ]; then DRY=1; shift; fi
RESULTS=${1:-gpu_check_results.txt}
: > "$RESULTS"
FAILED=0
export MEGADUAL_DEVICE_CHECK=1

step() {  # step TITLE COMMAND...: run COMMAND, its output and exit status into the results file
    local title=$1; shift
    echo "== $title ==" | tee -a "$RESULTS"
    "$@" 2>&1 | tee -a "$RESULTS"
    local status=${PIPESTATUS[0]}
    echo "== exit status $status: $title ==" | tee -a "$RESULTS"
    [ "$status" -eq 0 ] || FAILED=1
}

# Files whose tests take their device from device_under_test() (or single_process_group(), which does,
# or the on_device_under_test fixture, which makes a file's tensors and modules there, or that
# parametrize over cuda themselves): tests/test_gpu_check.py checks each. The rest of the
# one-process tests build on the CPU and are not listed (docs/devices.md).
SINGLE_PROCESS_TESTS=(tests/test_dropout.py tests/test_fp8_gemm.py tests/test_fp8_training.py tests/test_training.py
    tests/test_grouped_gemm.py tests/test_host_syncs.py tests/test_model.py tests/test_mla.py
    tests/test_router.py tests/test_wgrad.py tests/test_fp8_quant.py tests/test_fp8_linear.py
    tests/test_flops.py tests/test_cross_entropy.py)
TINY=(--mock-data --vocab-size 512 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32
      --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32
      --moe-first-k-dense 1 --micro-batch-size 1 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 1
      --moe-aux-loss-coeff 1e-2 --moe-router-bias-update-rate 1e-2 --moe-token-dispatcher-type hierarchical
      --eval-interval 2 --eval-iters 1)
if [ "$DRY" = 1 ]; then
    DEVICE=cpu SHARED=gloo ONE=gloo
    TESTS=(tests/test_host_syncs.py -k collectives)  # the command, not the coverage
    LAYOUTS=(ep2) OPTIMIZERS=("") ITERS=1
    TINY+=(--global-batch-size 2)  # two micro-batches of 1: the commands run, the budget still shows
    SYNC=(--train-iters 2)
    LOSS_GAP=(--steps 2 --window 1 --hidden-size 128 --num-layers 2 --seq-length 32 --threads 1)
    BENCH_STEP=(--model tiny --iters 1)
    BENCH_FP8=(--device cpu --backends reference --tokens 128 --warmup 0 --iters 1)
else
    DEVICE=cuda SHARED=cuda:gloo ONE=nccl
    TESTS=("${SINGLE_PROCESS_TESTS[@]}")
    LAYOUTS=(tp2,sp,ep2 ep4,nodes2 pp2:dualpipe,ep2) OPTIMIZERS=("" --use-distributed-optimizer) ITERS=2
    SYNC=(--train-iters 4 --bf16 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16 --seq-length 1024
          --moe-ffn-hidden-size 512 --moe-shared-expert-intermediate-size 512 --num-experts 16)
    LOSS_GAP=(--steps 30 --window 10 --hidden-size 1024 --num-layers 4 --seq-length 1024)
    BENCH_STEP=(--device cuda --iters 20)
    BENCH_FP8=()
fi

python3 - "$DEVICE" <<'PY' 2>&1 | tee -a "$RESULTS"
import sys, torch
print(f"== gpu_check on {sys.argv[1]}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else 'n/a'}, "
      + (f"device {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
         if torch.cuda.is_available() else "no CUDA device") + " ==")
PY
step "single-process tests on $DEVICE (the Triton FP8 GEMM against the reference among them)" \
    env MEGADUAL_TEST_DEVICE=$DEVICE python3 -m pytest -q -rfs -p no:cacheprovider "${TESTS[@]}"
for optimizer in "${OPTIMIZERS[@]}"; do
    step "multi-process layouts against one process, ranks sharing the $DEVICE under $SHARED ${optimizer}" \
        python3 -m megadual.verify "${TINY[@]}" --distributed-backend $SHARED $optimizer \
        --layouts "${LAYOUTS[@]}" --iters $ITERS
done
step "one process under $ONE: host transfers, CUDA synchronizations, measured memory" \
    python3 scripts/gpu_sync_check.py "${TINY[@]}" --distributed-backend $ONE "${SYNC[@]}"
step "the planner's memory prediction for the same flags" \
    python3 -m megadual.plan "${TINY[@]}" "${SYNC[@]}" --world-size 1
step "training steps: BF16 (fp32 below: CUDA's default precision) and FP8, loss gap, throughput" \
    python3 scripts/fp8_loss_gap.py --log-throughput "${LOSS_GAP[@]}"
step "grouped against per-expert-loop routed experts" python3 scripts/bench_step.py "${BENCH_STEP[@]}"
step "FP8 GEMM table" python3 scripts/bench_fp8.py "${BENCH_FP8[@]}"
echo "results in $RESULTS"
exit $FAILED
