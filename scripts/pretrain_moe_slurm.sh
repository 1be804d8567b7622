#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node (srun, one task per node), the nodes
# meeting at a c10d rendezvous on the first node of the allocation.
#
#   sbatch [sbatch options] scripts/pretrain_moe_slurm.sh [--] <pretrain_moe.py flags>
#
# Submit from the repository root (the job cd's to $SLURM_SUBMIT_DIR, or to $MEGADUAL_ROOT when
# set); relative paths in the flags are relative to it. Every #SBATCH line below is a default
# that the sbatch command line overrides, e.g.
#   sbatch --nodes 4 --gpus-per-node 8 --time 12:00:00 scripts/pretrain_moe_slurm.sh -- \
#       --tensor-model-parallel-size 2 --num-layers 16 ... --save checkpoints/run1
# env (exported to the job by sbatch):
#   NPROC_PER_NODE or GPUS_PER_NODE  processes per node; default: the GPUs Slurm gave each
#                                    node ($SLURM_GPUS_ON_NODE), else 1
#   MASTER_PORT                      rendezvous port; default 20000 + job id mod 20000
# The rendezvous host is the first node of `scontrol show hostnames $SLURM_JOB_NODELIST`, at the
# address Slurm itself reaches it by (its NodeAddr, which is the host name unless set otherwise).
#SBATCH --job-name=megadual
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=megadual-%j.out
set -euo pipefail

usage="usage: sbatch [sbatch options] $0 [--] <pretrain_moe.py flags>"
case "${1:-}" in
    -h|--help) echo "$usage"; exit 0 ;;
    --) shift ;;
esac
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "$0: not inside a Slurm job; $usage" >&2; exit 2; }

repo_root="${MEGADUAL_ROOT:-$SLURM_SUBMIT_DIR}"
cd "$repo_root"
[[ -f pretrain_moe.py ]] || {
    echo "$0: no pretrain_moe.py in $repo_root: submit from the repository root or set MEGADUAL_ROOT" >&2
    exit 2
}

nproc_per_node="${NPROC_PER_NODE:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}"
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
(( ${#hosts[@]} )) || { echo "$0: scontrol cannot expand '$SLURM_JOB_NODELIST'" >&2; exit 1; }
master_addr="$(scontrol show node "${hosts[0]}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
master_port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

launch=(srun --nodes "$SLURM_NNODES" --ntasks "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
        torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$nproc_per_node"
        --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "$SLURM_JOB_ID"
        pretrain_moe.py "$@")
echo "megadual job $SLURM_JOB_ID on ${hosts[*]} (rendezvous host ${hosts[0]}) in $PWD:"
echo "${launch[*]}"
"${launch[@]}"
