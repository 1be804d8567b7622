#!/usr/bin/env bash
# Train on this machine: torchrun --standalone with N processes running pretrain_moe.py.
#
#   scripts/pretrain_moe.sh [--nproc-per-node N] [--] <pretrain_moe.py flags>
#
#   --nproc-per-node N   processes (one per GPU on CUDA, gloo ranks on CPU); default
#                        $NPROC_PER_NODE, else 1
#
# Runs from the repository root whatever the current directory, so relative paths in the
# flags (--data-path, --save, ...) are relative to the repository root.
#
# Signals: told so below (--signals-to-handle; plain torchrun omits SIGUSR1 and SIGUSR2), torchrun
# passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 on to every worker, so with --exit-signal-handler (--exit-signal: which one) the run saves and stops; it
# then waits up to $SHUTDOWN_TIMEOUT seconds (default 300) for the workers to finish before it
# kills them, and exits 1 with its SignalException (the workers themselves exit 0). Example:
#   scripts/pretrain_moe.sh --nproc-per-node 2 -- --mock-data --vocab-size 512 --num-layers 2 \
#       --hidden-size 64 --num-attention-heads 4 --seq-length 32 --num-experts 8 \
#       --moe-router-topk 2 --moe-ffn-hidden-size 32 --micro-batch-size 2 \
#       --global-batch-size 8 --train-iters 4 --log-interval 1
set -euo pipefail

usage="usage: $0 [--nproc-per-node N] [--] <pretrain_moe.py flags>   env: NPROC_PER_NODE (1)"
nproc_per_node="${NPROC_PER_NODE:-1}"
case "${1:-}" in
    -h|--help) echo "$usage"; exit 0 ;;
    --nproc-per-node|--nproc_per_node)
        [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
        nproc_per_node="$2"; shift 2 ;;
esac
[[ "${1:-}" == "--" ]] && shift
[[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || { echo "$0: bad process count '$nproc_per_node'" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
launch=(torchrun --standalone --nproc-per-node "$nproc_per_node"
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}"
        pretrain_moe.py "$@")
echo "megadual launch in $PWD: ${launch[*]}"
exec "${launch[@]}"
