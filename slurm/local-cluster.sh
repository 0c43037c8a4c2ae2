#!/usr/bin/env bash
# A real Slurm cluster on this one machine, to try the sbatch scripts without a cluster: munge,
# slurmctld and one slurmd per node (n1, n2, ...), every node this host, each with GPUs as GRES
# (character devices standing in for them) so `#SBATCH --gpus-per-node=8` is accepted unchanged.
# Debian's packages (Slurm 22.05): apt-get install slurm-wlm munge. Runs as root.
#
#   slurm/local-cluster.sh start     start what is not running (again: starts nothing new)
#   slurm/local-cluster.sh stop      cancel the cluster's jobs, stop its daemons
#   slurm/local-cluster.sh status    the daemons and the nodes
#   slurm/local-cluster.sh kill-node n2   lose a node mid-job: SIGKILL its slurmd, its slurmstepd
#                                    processes and everything they run (start brings it back)
#
# Then, in the shell that submits: export SLURM_CONF=<folder>/slurm.conf (start prints it).
# Everything (configuration, state, spool, logs, the munge key and socket) lives in one folder;
# the daemons listen on 127.0.0.1 only. Settings (environment variables, read by start):
#   LOCAL_SLURM_DIR=/tmp/batch-classify-slurm   the folder (its path must be readable by the
#                                                munge user: not under a 0700 home)
#   LOCAL_SLURM_NODES=2      nodes, named n1 ... nN (LOCAL_SLURM_NODE_PREFIX=n)
#   LOCAL_SLURM_GPUS=8       GPUs (GRES) per node
#   LOCAL_SLURM_CPUS=        CPUs per node as Slurm counts them; default: this machine's, at least
#                            16 (label-array.sbatch asks for 16 per GPU)
#   LOCAL_SLURM_PORT=17000   slurmctld's port; node i listens on LOCAL_SLURM_PORT + i
#   LOCAL_SLURM_SLURMD_TIMEOUT=300   seconds without an answer before Slurm sets a node DOWN
#                            (and requeues its jobs): Slurm's default
# The node names must resolve to this machine: the rendezvous of a multi-node job connects to
# the first node by name. Where they do not, start adds "127.0.0.1 n1 n2 ..." to /etc/hosts.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # the daemons, for a user whose PATH lacks them

DIR=${LOCAL_SLURM_DIR:-/tmp/batch-classify-slurm}
# A cluster already made keeps its settings (start writes them here): later calls need none.
if [ -f "$DIR/settings.env" ] && [ -f "$DIR/run/slurmctld.pid" ] \
    && kill -0 "$(cat "$DIR/run/slurmctld.pid" 2>/dev/null)" 2>/dev/null; then
    # shellcheck source=/dev/null
    source "$DIR/settings.env"
fi
NODES=${LOCAL_SLURM_NODES:-2}
GPUS=${LOCAL_SLURM_GPUS:-8}
CPUS=${LOCAL_SLURM_CPUS:-$(($(nproc) > 16 ? $(nproc) : 16))}
PORT=${LOCAL_SLURM_PORT:-17000}
SLURMD_TIMEOUT=${LOCAL_SLURM_SLURMD_TIMEOUT:-300}
PREFIX=${LOCAL_SLURM_NODE_PREFIX:-n}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

say() { printf 'local-cluster: %s\n' "$*"; }
die() { printf 'local-cluster: error: %s\n' "$*" >&2; exit 1; }

node_names() {
    local i
    for ((i = 1; i <= NODES; i++)); do echo "$PREFIX$i"; done
}

# Whether process $1 is alive (a zombie, killed but not yet reaped, is not).
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || true
    [ "$state" != Z ]
}

# The pid in a pid file, if that process is alive.
running_pid() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

# Wait up to $2 seconds for the command "$3..." to succeed.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not happen within $seconds s; see $DIR/log"
        sleep 0.2
    done
}

check_prerequisites() {
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users)"
    local command
    for command in munged slurmctld slurmd sbatch scontrol; do
        command -v "$command" >/dev/null || die "$command not found: apt-get install slurm-wlm munge"
    done
    id munge >/dev/null 2>&1 || die "no munge user: apt-get install munge"
    case "$NODES$GPUS$CPUS$PORT$SLURMD_TIMEOUT" in
        *[!0-9]*) die "LOCAL_SLURM_NODES, _GPUS, _CPUS, _PORT and _SLURMD_TIMEOUT must be numbers" ;;
    esac
    if [ "$NODES" -lt 1 ] || [ "$GPUS" -lt 1 ] || [ "$CPUS" -lt 1 ]; then
        die "LOCAL_SLURM_NODES, _GPUS and _CPUS must be at least 1"
    fi
}

# Every node name must resolve to this machine (127.0.0.1): add them to /etc/hosts once.
ensure_names_resolve() {
    local name address missing=()
    for name in $(node_names); do
        address=$(getent hosts "$name" | awk '{ print $1; exit }') || true
        if [ -z "$address" ]; then
            missing+=("$name")
        elif [ "$address" != 127.0.0.1 ] && [ "$address" != ::1 ]; then
            die "node name $name resolves to $address, not this machine: set LOCAL_SLURM_NODE_PREFIX"
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        printf '127.0.0.1 %s  # batch-classify local Slurm\n' "${missing[*]}" >>/etc/hosts
        say "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
    fi
}

write_config() {
    local host i name
    host=$(hostname -s)
    mkdir -p "$DIR"/{state,spool,log,run,dev}
    # GRES needs a file per GPU; character devices stand in for them (a GRES without files is
    # refused: "count reported lower than configured").
    for ((i = 0; i < GPUS; i++)); do
        [ -c "$DIR/dev/gpu$i" ] || mknod -m 0666 "$DIR/dev/gpu$i" c 1 3
    done
    {
        echo "AutoDetect=off"
        for name in $(node_names); do
            echo "NodeName=$name Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]"
        done
    } >"$DIR/gres.conf"
    {
        cat <<EOF
# A local Slurm cluster made by slurm/local-cluster.sh: $NODES node(s), all on this machine.
ClusterName=localcluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmdTimeout=$SLURMD_TIMEOUT
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PropagateResourceLimits=NONE
# Finished jobs stay in 'scontrol show job' for an hour (there is no accounting database).
MinJobAge=3600
GresTypes=gpu
EOF
        # Every node is this host, on its own port.
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=$PREFIX$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i))" \
                "CPUs=$CPUS Gres=gpu:$GPUS State=UNKNOWN"
        done
        echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.new"
    mv "$CONF.new" "$CONF"
    cat >"$DIR/settings.env" <<EOF
LOCAL_SLURM_NODES=$NODES LOCAL_SLURM_GPUS=$GPUS LOCAL_SLURM_CPUS=$CPUS LOCAL_SLURM_PORT=$PORT
LOCAL_SLURM_SLURMD_TIMEOUT=$SLURMD_TIMEOUT LOCAL_SLURM_NODE_PREFIX=$PREFIX
EOF
}

start_munge() {
    local dir=$DIR/munge
    if running_pid "$dir/munged.pid" >/dev/null; then
        return 0
    fi
    mkdir -p "$dir"
    chown munge: "$dir"
    chmod 0755 "$dir"
    if [ ! -s "$dir/munge.key" ]; then
        head -c 1024 /dev/urandom >"$dir/munge.key"
    fi
    chown munge: "$dir/munge.key"
    chmod 0400 "$dir/munge.key"
    runuser -u munge -- test -r "$dir/munge.key" \
        || die "the munge user cannot reach $dir: pick a LOCAL_SLURM_DIR whose parents it may enter"
    runuser -u munge -- "$(command -v munged || echo /usr/sbin/munged)" --socket="$MUNGE_SOCKET" \
        --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
        --seed-file="$dir/munged.seed"
    wait_for "munged start" 20 test -S "$MUNGE_SOCKET"
    say "started munged (as munge)"
}

start_slurmctld() {
    running_pid "$DIR/run/slurmctld.pid" >/dev/null && return 0
    slurmctld -f "$CONF"
    wait_for "slurmctld start" 30 scontrol ping
    say "started slurmctld on 127.0.0.1:$PORT"
}

start_slurmd() {
    local name=$1
    running_pid "$DIR/run/slurmd-$name.pid" >/dev/null && return 0
    mkdir -p "$DIR/spool/$name"
    slurmd -f "$CONF" -N "$name"
    wait_for "slurmd $name start" 30 running_pid "$DIR/run/slurmd-$name.pid"
    say "started slurmd -N $name"
}

node_state() { scontrol show node "$1" 2>/dev/null | sed -n 's/.*State=\([^ ]*\).*/\1/p'; }

node_ready() {
    local state
    state=$(node_state "$1")
    case $state in
        '' | *DOWN* | *DRAIN* | *FAIL* | *INVAL* | *UNKNOWN* | *NOT_RESPONDING*) return 1 ;;
    esac
}

start() {
    check_prerequisites
    ensure_names_resolve
    if ! running_pid "$DIR/run/slurmctld.pid" >/dev/null || [ ! -f "$CONF" ]; then
        write_config
    fi
    start_munge
    start_slurmctld
    local name
    for name in $(node_names); do
        start_slurmd "$name"
    done
    for name in $(node_names); do
        # A node that was down (its slurmd stopped) or drained comes back here.
        if ! node_ready "$name"; then
            sleep 1
            node_ready "$name" || scontrol update nodename="$name" state=resume 2>/dev/null || true
        fi
        wait_for "node $name idle" 60 node_ready "$name"
    done
    status
    cat <<EOF
state, spool and logs: $DIR (log/slurmctld.log, log/slurmd-<node>.log, munge/munged.log)
to use it:  export SLURM_CONF=$CONF
to stop it: $0 stop   (with the same LOCAL_SLURM_DIR)
EOF
}

stop_pid_file() {
    local pid_file=$1 pid
    pid=$(running_pid "$pid_file") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    [ -d "$DIR" ] || { say "nothing at $DIR"; return 0; }
    if running_pid "$DIR/run/slurmctld.pid" >/dev/null; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs $jobs"
            # shellcheck disable=SC2086  # one argument per job id
            scancel --full --signal=KILL $jobs 2>/dev/null || true
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do
                sleep 0.5
            done
        fi
    fi
    local pid_file
    for pid_file in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
        [ -e "$pid_file" ] && stop_pid_file "$pid_file"
    done
    # What a node killed mid-job left behind: its slurmstepd processes and what they ran.
    local node_log
    local -a stepds pids
    for node_log in "$DIR"/log/slurmd-*.log; do
        [ -e "$node_log" ] || continue
        node_log=${node_log##*/slurmd-}
        mapfile -t stepds < <(stepd_pids "${node_log%.log}")
        if [ ${#stepds[@]} -gt 0 ]; then
            mapfile -t pids < <(with_descendants "${stepds[@]}")
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    done
    say "stopped (state and logs stay in $DIR)"
}

# The slurmstepd processes of node $1: their log (fd 3) is that node's slurmd log.
stepd_pids() {
    local pid
    for pid in $(pgrep -f '^slurmstepd' 2>/dev/null); do
        if [ "$(readlink "/proc/$pid/fd/3" 2>/dev/null)" = "$DIR/log/slurmd-$1.log" ]; then
            echo "$pid"
        fi
    done
}

# $@ and all their descendants.
with_descendants() {
    local -a frontier=("$@") next
    local pid
    while [ ${#frontier[@]} -gt 0 ]; do
        printf '%s\n' "${frontier[@]}"
        next=()
        for pid in "${frontier[@]}"; do
            mapfile -t -O "${#next[@]}" next < <(pgrep -P "$pid" 2>/dev/null)
        done
        frontier=(${next[@]+"${next[@]}"})
    done
}

kill_node() {
    local name=${1:?usage: $0 kill-node <node name>} slurmd
    local -a stepds pids
    slurmd=$(running_pid "$DIR/run/slurmd-$name.pid") || die "no slurmd running for node $name"
    mapfile -t stepds < <(stepd_pids "$name")
    mapfile -t pids < <(with_descendants "$slurmd" ${stepds[@]+"${stepds[@]}"})
    kill -KILL "${pids[@]}" 2>/dev/null || true
    local pid deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    done
    say "node $name lost: killed slurmd and ${#pids[@]} process(es) in all; '$0 start' brings it back"
}

status() {
    local name pid
    printf 'munged:    %s\n' "$(running_pid "$DIR/munge/munged.pid" || echo 'not running')"
    printf 'slurmctld: %s\n' "$(running_pid "$DIR/run/slurmctld.pid" || echo 'not running')"
    for name in $(node_names); do
        pid=$(running_pid "$DIR/run/slurmd-$name.pid") || pid='not running'
        printf 'slurmd %s: %s\n' "$name" "$pid"
    done
    if running_pid "$DIR/run/slurmctld.pid" >/dev/null; then
        sinfo -N -o '%N %T %c %G' 2>/dev/null || true
        printf '%s\n' "$(slurmctld -V 2>/dev/null || true)"
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    kill-node) kill_node "${2:-}" ;;
    *) die "usage: $0 start|stop|status|kill-node <node> (settings: see the top of this file)" ;;
esac
