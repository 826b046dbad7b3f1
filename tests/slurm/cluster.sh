#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/e2e/test_slurm.py: Debian's munge, slurmctld
# and slurmd (SLURM 22.05) with this host as the one node of one partition, started directly (no
# systemd) with their configuration, sockets, state and logs in one folder.
#
#   tests/slurm/cluster.sh install      install the packages (as root; apt retried on a flaky network)
#   tests/slurm/cluster.sh start DIR    write DIR/slurm.conf, start the daemons, wait for the node;
#                                       then export SLURM_CONF=DIR/slurm.conf to use the cluster
#   tests/slurm/cluster.sh stop DIR     stop the daemons that `start DIR` started, by their PIDs
#
# Ports 16817/16818 and the munge socket in DIR keep it apart from any system-wide SLURM.
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client)

installed() {
    local command
    for command in munged slurmctld slurmd sinfo sbatch squeue scancel; do
        command -v "$command" > /dev/null || return 1
    done
}

install() {
    local attempt
    installed && return 0
    [ "$(id -u)" = 0 ] || { echo "slurm: installing the packages needs root" >&2; return 1; }
    command -v apt-get > /dev/null || { echo "slurm: no apt-get on this machine" >&2; return 1; }
    for attempt in 1 2 3; do
        if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Acquire::Retries=5 "${packages[@]}" > /dev/null; then
            return 0
        fi
        echo "slurm: apt-get install failed (attempt $attempt of 3)" >&2
        if [ "$attempt" -lt 3 ]; then sleep 20; fi
    done
    return 1
}

start() {
    local dir host cpus memory
    dir="$(mkdir -p "$1" && cd "$1" && pwd)"
    host="$(hostname -s)"
    cpus="$(nproc)"
    # what jobs may ask for: the machine's memory less 1 GB for the system and the daemons
    memory="$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    # munged refuses a socket whose folders others cannot enter (mktemp -d makes DIR 0700)
    chmod 755 "$dir" "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    cat > "$dir/slurm.conf" << EOF
ClusterName=fusion-tests
SlurmctldHost=$host
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# a cancelled job gets SIGTERM, then SIGKILL this many seconds later (submitit's jobs ignore SIGTERM)
KillWait=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    # each daemon in the foreground, in the background of this shell: its PID is ours to stop
    munged --foreground --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" > /dev/null 2>&1 &
    echo $! > "$dir/munged.daemon"
    for _ in $(seq 50); do [ -S "$dir/munge/munge.socket.2" ] && break; sleep 0.1; done
    if [ ! -S "$dir/munge/munge.socket.2" ]; then
        echo "slurm: munged did not start; see $dir/munge/munged.log" >&2
        return 1
    fi
    slurmctld -D -i > "$dir/slurmctld.out" 2>&1 &
    echo $! > "$dir/slurmctld.daemon"
    slurmd -D > "$dir/slurmd.out" 2>&1 &
    echo $! > "$dir/slurmd.daemon"
    for _ in $(seq 120); do
        if [ "$(timeout 5 sinfo -h -o %T 2> /dev/null)" = "idle" ]; then
            echo "slurm: node $host ($cpus CPUs, $memory MB) idle; export SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm: the node did not come up within 60 s; see $dir/*.log and $dir/*.out" >&2
    return 1
}

stop() {
    local dir="$1" pidfile pid
    for pidfile in "$dir/slurmd.daemon" "$dir/slurmctld.daemon" "$dir/munged.daemon"; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        if kill "$pid" 2> /dev/null; then
            for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2> /dev/null || true
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *)
        echo "usage: $0 install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
