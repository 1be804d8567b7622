#!/usr/bin/env bash
# DeepSeek-V3's training recipe (technical report, sections 4.2 and 4.3) as megadual phases, run in
# order through one checkpoint directory: each phase loads the last one's model, optimizer and data
# position and takes its own schedule (--override-opt-param-scheduler), bias update speed, MTP loss
# weight and sequence length. Details: docs/recipe.md.
#
#   pretraining (sample-based, 4K tokens, batch ramped 3072 -> 15360 over the first 469B tokens)
#     1. 0 -> 10T tokens      LR warm-up to 2.2e-4 over 2K steps, then constant; MTP 0.3, bias 0.001
#     2. 10T -> 14.3T         cosine 2.2e-4 -> 2.2e-5 (WSD's cosine decay); MTP 0.1, bias 0.001
#     3. 14.3T -> 14.633T     2.2e-5; bias 0
#     4. -> 14.8T             7.3e-6; bias 0
#   context extension (YaRN s=40, alpha 1, beta 32, mscale 1 / mscale-all-dim 1: sqrt(t) = 0.1 ln s + 1)
#     5. 1000 steps at 32K tokens, batch 1920, LR 7.3e-6
#     6. 1000 steps at 128K tokens, batch 480, LR 7.3e-6
#
# Every number below can be set from the environment; the defaults are the report's. The test
# (tests/test_recipe.py) runs it with tiny sizes and token counts on CPU. Token counts are divided
# by the sequence length into samples (Megatron's --train-samples), so give them as multiples of it.
#
#   SAVE=/ckpt/v3 DATA_ARGS="--data-path ... --tokenizer-type ..." examples/deepseek_v3_recipe.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SAVE="${SAVE:?set SAVE to the checkpoint directory the phases share}"
MODEL_ARGS="${MODEL_ARGS:-@examples/deepseek_v3_671b.args}"   # model, layout, optimizer (not the schedule)
DATA_ARGS="${DATA_ARGS:---mock-data}"
LAUNCH="${LAUNCH:-scripts/pretrain_moe.sh --}"                 # or: python pretrain_moe.py
EXTRA_ARGS="${EXTRA_ARGS:-}"                                  # flags for every phase
EXT_ARGS="${EXT_ARGS:-}"                                      # flags for the two extension phases (layout)
# Every batch must split into micro-batches of --micro-batch-size over the data-parallel ranks, at
# least 2 x PP of them under DualPipe; megadual checks each batch of the ramp at start-up. At V3's
# PP16 x DP128 layout the ramp's first batch (3072: 24 micro-batches) and the extensions' (1920,
# 480) do not: give those phases a layout that fits (EXTRA_ARGS, EXT_ARGS, or the launcher's ranks).

SEQ="${SEQ:-4096}"
GBS="${GBS:-15360}"
RAMP_START="${RAMP_START:-3072}"
RAMP_INCREMENT="${RAMP_INCREMENT:-3072}"       # the report gives no step: 4 increments
RAMP_TOKENS="${RAMP_TOKENS:-469000000000}"
WARMUP_STEPS="${WARMUP_STEPS:-2000}"           # at RAMP_START: the warm-up ends in the ramp's first stage
LR="${LR:-2.2e-4}"
DECAYED_LR="${DECAYED_LR:-2.2e-5}"
FINAL_LR="${FINAL_LR:-7.3e-6}"
CONSTANT_TOKENS="${CONSTANT_TOKENS:-10000000000000}"   # 10T: constant LR, MTP weight 0.3
DECAY_TOKENS="${DECAY_TOKENS:-4300000000000}"          # 4.3T: cosine decay
LOW_LR_TOKENS="${LOW_LR_TOKENS:-333000000000}"         # 333B at DECAYED_LR, bias update speed 0 from here
FINAL_LR_TOKENS="${FINAL_LR_TOKENS:-167000000000}"     # 167B at FINAL_LR
BIAS_RATE="${BIAS_RATE:-0.001}"
MTP_EARLY="${MTP_EARLY:-0.3}"
MTP_LATE="${MTP_LATE:-0.1}"
EXT_STEPS="${EXT_STEPS:-1000}"
EXT1_SEQ="${EXT1_SEQ:-32768}"
EXT1_GBS="${EXT1_GBS:-1920}"
EXT2_SEQ="${EXT2_SEQ:-131072}"
EXT2_GBS="${EXT2_GBS:-480}"
YARN_FACTOR="${YARN_FACTOR:-40}"

samples() { echo $(( $1 / SEQ )); }
end1=$(samples "$CONSTANT_TOKENS")
end2=$(( end1 + $(samples "$DECAY_TOKENS") ))
end3=$(( end2 + $(samples "$LOW_LR_TOKENS") ))
end4=$(( end3 + $(samples "$FINAL_LR_TOKENS") ))
end5=$(( end4 + EXT_STEPS * EXT1_GBS ))
end6=$(( end5 + EXT_STEPS * EXT2_GBS ))
warmup=$(( WARMUP_STEPS * RAMP_START ))

phase() {  # phase NAME FLAGS...: one run, loading and saving $SAVE
    local name="$1"; shift
    echo "=== recipe phase: $name"
    # shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
    $LAUNCH $MODEL_ARGS $DATA_ARGS --load "$SAVE" --save "$SAVE" "$@" $EXTRA_ARGS
}

pretrain=(--seq-length "$SEQ" --global-batch-size "$GBS"
          --rampup-batch-size "$RAMP_START" "$RAMP_INCREMENT" "$(samples "$RAMP_TOKENS")"
          --lr-warmup-samples "$warmup" --override-opt-param-scheduler)
phase "1 constant LR" "${pretrain[@]}" --train-samples "$end1" --lr "$LR" --min-lr "$DECAYED_LR" \
    --lr-decay-style constant --moe-router-bias-update-rate "$BIAS_RATE" --mtp-loss-scaling-factor "$MTP_EARLY"
phase "2 cosine decay" "${pretrain[@]}" --train-samples "$end2" --lr "$LR" --min-lr "$DECAYED_LR" \
    --lr-decay-style WSD --lr-wsd-decay-style cosine --lr-decay-samples "$end2" \
    --lr-wsd-decay-samples "$(( end2 - end1 ))" --moe-router-bias-update-rate "$BIAS_RATE" \
    --mtp-loss-scaling-factor "$MTP_LATE"
phase "3 decayed LR" "${pretrain[@]}" --train-samples "$end3" --lr "$DECAYED_LR" --min-lr "$DECAYED_LR" \
    --lr-decay-style constant --moe-router-bias-update-rate 0 --mtp-loss-scaling-factor "$MTP_LATE"
phase "4 final LR" "${pretrain[@]}" --train-samples "$end4" --lr "$FINAL_LR" --min-lr "$FINAL_LR" \
    --lr-decay-style constant --moe-router-bias-update-rate 0 --mtp-loss-scaling-factor "$MTP_LATE"

yarn=(--rope-scaling-factor "$YARN_FACTOR" --original-max-position-embeddings "$SEQ" --beta-fast 32 --beta-slow 1
      --mscale 1 --mscale-all-dim 1 --lr "$FINAL_LR" --min-lr "$FINAL_LR" --lr-decay-style constant
      --override-opt-param-scheduler --moe-router-bias-update-rate 0 --mtp-loss-scaling-factor "$MTP_LATE")
# shellcheck disable=SC2086
phase "5 32K context" "${yarn[@]}" --seq-length "$EXT1_SEQ" --global-batch-size "$EXT1_GBS" \
    --train-samples "$end5" $EXT_ARGS
# shellcheck disable=SC2086
phase "6 128K context" "${yarn[@]}" --seq-length "$EXT2_SEQ" --global-batch-size "$EXT2_GBS" \
    --train-samples "$end6" $EXT_ARGS
echo "=== recipe done: $SAVE"
