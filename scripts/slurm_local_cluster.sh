#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for tests of the SLURM launcher.
#
#   scripts/slurm_local_cluster.sh start    install Debian's slurm + munge packages when missing,
#                                           start munged, slurmctld and two slurmd (nodes n1, n2,
#                                           both at 127.0.0.1 on their own ports), wait until both
#                                           nodes answer; does nothing to daemons already running
#   scripts/slurm_local_cluster.sh stop     cancel its jobs and stop the daemons
#   scripts/slurm_local_cluster.sh status   exit 0 when all four daemons run and both nodes answer
#
# Then point the Slurm commands at it:  export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
#   sinfo; srun -N2 hostname; sbatch --nodes 2 --cpus-per-task 1 scripts/pretrain_moe_slurm.sh -- ...
#
# Runs as root and needs no systemd: the daemons are started directly. Everything it writes
# (munge key and socket, slurm.conf, state, spool, logs, pid files) lies under SLURM_LOCAL_DIR,
# and every daemon, munged included, is its own, so clusters in different directories on
# different ports run side by side and stopping one leaves the others alone (the tests start
# theirs in a fresh directory on free ports: tests/conftest.py, slurm_cluster).
# env: SLURM_LOCAL_DIR (/tmp/megadual-slurm), SLURM_LOCAL_PORT (16817: slurmctld; the nodes
#      use the next two ports), SLURM_LOCAL_CPUS (CPUs declared per node, default nproc).
# Exit status 3 means the packages could not be installed (e.g. no network).
set -euo pipefail

usage="usage: $0 start|stop|status   env: SLURM_LOCAL_DIR SLURM_LOCAL_PORT SLURM_LOCAL_CPUS"
case "${1:-}" in
    -h|--help) echo "$usage"; exit 0 ;;
    start|stop|status) [[ $# -eq 1 ]] || { echo "$usage" >&2; exit 2; } ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

work="${SLURM_LOCAL_DIR:-/tmp/megadual-slurm}"
ctld_port="${SLURM_LOCAL_PORT:-16817}"
cpus="${SLURM_LOCAL_CPUS:-$(nproc)}"
nodes=(n1 n2)
export SLURM_CONF="$work/slurm.conf"

pid_alive() {  # pid_alive PIDFILE: the process named in PIDFILE runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

nodes_up() {  # both nodes registered and usable (idle, or busy with jobs)
    local states
    states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
    [[ "$(grep -cE '^n[12] (idle|mix|alloc|comp)$' <<<"$states")" -eq 2 ]]
}

daemons_up() {
    local node
    pid_alive "$work/run/munged.pid" && pid_alive "$work/run/slurmctld.pid" || return 1
    for node in "${nodes[@]}"; do pid_alive "$work/run/slurmd-$node.pid" || return 1; done
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    local packages=(slurmctld slurmd slurm-client munge)
    echo "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${packages[@]}"; then
        apt-get update && apt-get install -y --no-install-recommends "${packages[@]}" \
            || { echo "$0: could not install ${packages[*]}" >&2; exit 3; }
    fi
}

write_config() {
    mkdir -p "$work"/{munge,run,log,state,spool}
    if [[ ! -s "$work/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$work/munge/munge.key"
    fi
    cat > "$SLURM_CONF" <<EOF
# written by scripts/slurm_local_cluster.sh: two slurmd on this host, n1 and n2
ClusterName=megadual-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (by cred_expire + 1 s; Slurm's default 120)
AuthInfo=socket=$work/munge/munge.socket,cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool/%n
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd-%n.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# keeps a finished job 16 s; sbatch --wait then polls every 8 s instead of backing off to 32 s
MinJobAge=16
SlurmdParameters=config_overrides
NodeName=n1 NodeAddr=127.0.0.1 Port=$((ctld_port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((ctld_port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_packages
    if daemons_up && nodes_up; then
        echo "slurm cluster already up in $work"
    else
        write_config
        pid_alive "$work/run/munged.pid" || munged --force --key-file="$work/munge/munge.key" \
            --socket="$work/munge/munge.socket" --pid-file="$work/run/munged.pid" \
            --log-file="$work/log/munged.log" --seed-file="$work/munge/munged.seed"
        pid_alive "$work/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
        local node
        for node in "${nodes[@]}"; do
            pid_alive "$work/run/slurmd-$node.pid" || slurmd -N "$node" -f "$SLURM_CONF"
        done
        local waited=0
        until nodes_up; do
            # A daemon that exits (e.g. its port is taken) fails the start after 2 s, not 30; the
            # grace is for daemons that write their pid files after they return.
            if { (( waited > 4 )) && ! daemons_up; } || (( waited++ >= 60 )); then
                echo "$0: nodes not up (a daemon exited, or 30 s passed); logs in $work/log:" >&2
                tail -n 5 "$work"/log/*.log >&2 || true
                exit 1
            fi
            sleep 0.5
        done
    fi
    sinfo -N
    echo "use it with: export SLURM_CONF=$SLURM_CONF"
}

stop_daemons() {  # stop_daemons PIDFILE...: TERM those processes together, KILL any left after 10 s
    local pidfile pids=() waited=0
    for pidfile in "$@"; do
        if pid_alive "$pidfile"; then pids+=("$(cat "$pidfile")"); fi
    done
    if (( ${#pids[@]} )); then
        kill "${pids[@]}"
        while kill -0 "${pids[@]}" 2>/dev/null; do  # true while any of them runs
            if (( waited++ == 100 )); then kill -9 "${pids[@]}" 2>/dev/null || true; fi
            sleep 0.1
        done
    fi
    rm -f "$@"
}

stop() {
    if pid_alive "$work/run/slurmctld.pid"; then
        squeue -h -o %A | xargs -r scancel || true
    fi
    stop_daemons "$work"/run/slurmd-{n1,n2}.pid "$work/run/slurmctld.pid" "$work/run/munged.pid"
    echo "slurm cluster in $work stopped"
}

case "$1" in
    start) start ;;
    stop) stop ;;
    status) daemons_up && nodes_up ;;
esac
