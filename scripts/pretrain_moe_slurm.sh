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
#
# Time limit and requeue: Slurm sends this script SIGUSR1 some time before the time limit
# (--signal=B:USR1@300: 5 minutes; give more when a save takes longer). The script passes it to
# srun, srun to each node's torchrun, torchrun to its workers (--signals-to-handle), which run
# with --exit-signal-handler --exit-signal SIGUSR1: every rank finishes the iteration they agree
# on, the run saves to --save, and the job requeues itself (scontrol requeue). The requeued run
# (SLURM_RESTART_COUNT > 0) gets --load SAVE added unless the flags name a --load, so it resumes
# from the last checkpoint with no change to the command. Output is appended, so one file holds
# every run of the job.
# env (exported to the job by sbatch):
#   NPROC_PER_NODE or GPUS_PER_NODE  processes per node; default: the GPUs Slurm gave each
#                                    node ($SLURM_GPUS_ON_NODE), else 1
#   MASTER_PORT                      rendezvous port; default 20000 + job id mod 20000
#   MEGADUAL_REQUEUE                 0: on the warning, save and stop but do not requeue (for
#                                    clusters that forbid requeue); default 1
#   SHUTDOWN_TIMEOUT                 seconds torchrun waits for its workers to save and exit
#                                    after a signal before it kills them; default 300
# The rendezvous host is the first node of `scontrol show hostnames $SLURM_JOB_NODELIST`, at the
# address Slurm itself reaches it by (its NodeAddr, which is the host name unless set otherwise).
#SBATCH --job-name=megadual
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=megadual-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
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

requeue="${MEGADUAL_REQUEUE:-1}"
[[ "$requeue" == 0 || "$requeue" == 1 ]] || { echo "$0: MEGADUAL_REQUEUE must be 0 or 1, not '$requeue'" >&2; exit 2; }

flags=("$@")
flag_value() {  # flag_value NAME: the value of --NAME in the flags (last one wins), or nothing
    local i value=""
    for ((i = 0; i < ${#flags[@]}; i++)); do
        case "${flags[i]}" in
            "--$1") value="${flags[i + 1]:-}" ;;
            "--$1="*) value="${flags[i]#*=}" ;;
        esac
    done
    printf '%s' "$value"
}
save="$(flag_value save)"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && [[ -n "$save" && -z "$(flag_value load)" ]]; then
    echo "megadual job $SLURM_JOB_ID: run $((SLURM_RESTART_COUNT + 1)), resuming from --save $save"
    flags+=(--load "$save")
fi
flags+=(--exit-signal-handler --exit-signal SIGUSR1)

launch=(srun --nodes "$SLURM_NNODES" --ntasks "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
        torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$nproc_per_node"
        --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "$SLURM_JOB_ID"
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}"
        pretrain_moe.py "${flags[@]}")
echo "megadual job $SLURM_JOB_ID on ${hosts[*]} (rendezvous host ${hosts[0]}) in $PWD:"
echo "${launch[*]}"

warned=0
on_time_limit_warning() {
    warned=1
    echo "megadual job $SLURM_JOB_ID: time-limit warning (SIGUSR1): every rank saves and stops"
    kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_time_limit_warning USR1
"${launch[@]}" &  # in the background: bash holds a trap until a foreground command ends; `wait` yields
srun_pid=$!
while true; do
    status=0
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # else a trapped signal ended the wait, not srun
done
if (( warned )); then
    echo "megadual job $SLURM_JOB_ID: torchrun exits 1 (with a SignalException) after passing a signal on;" \
         "the workers' 'exiting program' line above says whether they saved"
    if (( requeue )) && [[ -n "$save" ]]; then
        echo "megadual job $SLURM_JOB_ID: requeued; the next run resumes from $save"
        scontrol requeue "$SLURM_JOB_ID"
    elif (( requeue )); then
        echo "megadual job $SLURM_JOB_ID: not requeued: without --save there is nothing to resume from"
    else
        echo "megadual job $SLURM_JOB_ID: stopped before the time limit; MEGADUAL_REQUEUE=0, so not requeued"
    fi
    exit 0
fi
exit "$status"
