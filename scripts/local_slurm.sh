#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests: munge, slurmctld and slurmd with fake GPUs.
#
#   scripts/local_slurm.sh start    install slurm-wlm + munge with apt-get when missing, write
#                                   /etc/slurm/slurm.conf and gres.conf, start the three daemons
#                                   and wait until the node is idle (about 20 s on a bare machine,
#                                   under 1 s once installed)
#   scripts/local_slurm.sh stop     stop the daemons this script started (by their recorded PIDs)
#   scripts/local_slurm.sh status   say what runs and what sinfo reports
#
# Needs root (it writes /etc/slurm and starts daemons) and Debian/Ubuntu's apt-get when SLURM is
# not installed. Exit status 2: not root, 3: cannot install, 4: the cluster did not come up,
# 5: a SLURM that this script did not start is already running or configured.
# Environment: EEBENCH_SLURM_STATE (PID files and daemon output; default /tmp/eebench-slurm),
# EEBENCH_SLURM_GPUS (fake GPUs declared on the node; default 2).
set -euo pipefail

STATE=${EEBENCH_SLURM_STATE:-/tmp/eebench-slurm}
GPUS=${EEBENCH_SLURM_GPUS:-2}
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# written by eebench scripts/local_slurm.sh"
DAEMONS=(munged slurmctld slurmd)  # start order; stopped in reverse

say() { echo "local_slurm: $*" >&2; }

alive() {  # alive NAME: the recorded PID of NAME runs
    local pidfile="$STATE/$1.pid"
    [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.1 s
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "$what did not happen within ${limit} s; daemon output is in $STATE"
            return 1
        fi
        sleep 0.1
    done
}

node_idle() { sinfo -h -o %T 2>/dev/null | grep -qx idle; }
ctld_up() { scontrol ping 2>/dev/null | grep -q UP; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        say "SLURM is not installed and apt-get is not available: install slurm-wlm and munge"
        exit 3
    fi
    say "installing slurm-wlm and munge with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        >"$STATE/apt.log" 2>&1; then
        say "apt-get failed; see $STATE/apt.log"
        tail -n 20 "$STATE/apt.log" >&2
        exit 3
    fi
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        say "$CONF exists and was not written by this script; not touching it"
        exit 5
    fi
    local node cpus mem
    node=$(slurmd -C | head -n 1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$((mem > 2048 ? mem - 1024 : mem))
    mkdir -p /etc/slurm
    cat >"$CONF" <<EOF
$MARK
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
MailProg=/bin/true
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:fake:$GPUS State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    {
        echo "$MARK"
        echo "AutoDetect=off"
        # one line per fake GPU, each naming an existing device file (a Count= line is rejected)
        local i
        for ((i = 0; i < GPUS; i++)); do
            echo "NodeName=localhost Name=gpu Type=fake File=$([[ $((i % 2)) == 0 ]] && echo /dev/null || echo /dev/zero)"
        done
    } >"$GRES"
}

start() {
    if [[ $(id -u) != 0 ]]; then
        say "needs root (writes /etc/slurm, starts munged/slurmctld/slurmd)"
        exit 2
    fi
    mkdir -p "$STATE"
    if alive munged && alive slurmctld && alive slurmd && node_idle; then
        say "already running (PIDs in $STATE)"
        return 0
    fi
    local d
    for d in "${DAEMONS[@]}"; do
        if ! alive "$d" && pgrep -x "$d" >/dev/null; then
            say "a $d that this script did not start is running; stop it first"
            exit 5
        fi
    done
    install
    write_config
    # node and job state survive restarts and can keep the node drained: start clean
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
    mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi

    if ! alive munged; then
        # setpriv execs, so $! is munged itself (runuser would leave its own PID in $!)
        setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
            >"$STATE/munged.out" 2>&1 </dev/null &
        echo $! >"$STATE/munged.pid"
    fi
    wait_for 20 "munge credential" munge -n || { stop; exit 4; }

    if ! alive slurmctld; then
        setsid /usr/sbin/slurmctld -D -i >"$STATE/slurmctld.out" 2>&1 </dev/null &
        echo $! >"$STATE/slurmctld.pid"
    fi
    wait_for 30 "slurmctld ping" ctld_up || { stop; exit 4; }

    if ! alive slurmd; then
        setsid /usr/sbin/slurmd -D -N localhost >"$STATE/slurmd.out" 2>&1 </dev/null &
        echo $! >"$STATE/slurmd.pid"
    fi
    wait_for 30 "node idle" node_idle || { stop; exit 4; }
    say "up: $(sinfo -h -o '%P %a %D %T %N %G' | head -n 1)"
}

stop() {
    local i d pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        [[ -s $STATE/$d.pid ]] || continue
        pid=$(cat "$STATE/$d.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                say "$d ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$STATE/$d.pid"
    done
}

status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d running (PID $(cat "$STATE/$d.pid"))"
        else
            echo "$d not running"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo || rc=1
    fi
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 {start|stop|status}" >&2
        exit 64
        ;;
esac
