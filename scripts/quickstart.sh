#!/usr/bin/env bash
# Quick start on a CPU: install, build the sample corpus (the Python standard library's
# own sources, no download), pretrain a small DeepSeek-V3-shaped MoE (multi-head latent
# attention, one multi-token prediction module) for a few minutes with a checkpoint, then
# resume from that checkpoint for a few more iterations.
#   bash scripts/quickstart.sh            (ITERS=200 by default; RESUME_ITERS=20 more after resuming)
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-200}
RESUME_ITERS=${RESUME_ITERS:-20}
SAVE=${SAVE:-checkpoints/quickstart}
python3 -m pip install -q -r requirements.txt
bash scripts/prepare_sample_corpus.sh data
MODEL=(--num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128
       --multi-latent-attention --q-lora-rank 64 --kv-lora-rank 32 --qk-head-dim 32 --qk-pos-emb-head-dim 16
       --v-head-dim 32 --mtp-num-layers 1
       --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 128 --moe-shared-expert-intermediate-size 128
       --moe-first-k-dense 1 --moe-router-num-groups 2 --moe-router-max-nodes 1 --moe-router-bias-update-rate 1e-2
       --data-path data/stdlib_text_document --split 98,2,0
       --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/stdlib_tokenizer.json
       --micro-batch-size 4 --global-batch-size 8 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-iters "$ITERS"
       --log-interval 10 --eval-interval 100 --eval-iters 4 --save "$SAVE" --save-interval 100)
rm -rf "$SAVE"
python3 pretrain_moe.py "${MODEL[@]}" --train-iters "$ITERS"
echo "== resuming from $SAVE =="
python3 pretrain_moe.py "${MODEL[@]}" --train-iters $((ITERS + RESUME_ITERS)) --load "$SAVE"
