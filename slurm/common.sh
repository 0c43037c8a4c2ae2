# shellcheck shell=bash
# The launch logic shared by the sbatch scripts in this folder. Sourced, never run: sourcing only
# defines the settings below and functions; the sbatch script then calls `classify_main "$@"`.
#
# Site settings. Each is an environment variable: export it before `sbatch` (sbatch passes the
# submitting shell's environment on), or pin it in the "Site settings" block at the top of an
# sbatch script. The defaults:
: "${PYTHON:=python3}"            # the interpreter with batch-classify installed (a venv's python)
: "${GPU_PLATFORM:=auto}"         # rocm | cuda | none | auto: which env-*.sh every node sources;
                                  # auto: /dev/kfd means ROCm, /dev/nvidiactl or nvidia-smi CUDA
: "${GPUS_PER_NODE:=}"            # ranks per node; empty: the GPUs Slurm allocated on the node
: "${CPUS_PER_NODE:=}"            # CPUs the launch step gets on each node (srun --cpus-per-task);
                                  # empty: the allocation's (the smallest node's)
: "${LOG_DIR:=logs}"              # per-node logs; keep it equal to the #SBATCH --output folder
: "${NODE_LOG:=%x-%j-node%n-%N.out}"  # per-node log name (srun filename patterns)
: "${NODE_LOCAL_DIR:=${SLURM_TMPDIR:-/tmp}}"  # a node-local disk: per-job caches (MIOpen) go here
: "${RDZV_BACKEND:=}"             # c10d | static; empty: c10d for several nodes, static for one
: "${MAIN_PROCESS_PORT:=}"        # rendezvous port; empty: derived from the job id
: "${MAIN_PROCESS_IP:=}"          # rendezvous host; empty: the first host of the allocation
: "${MAX_REQUEUES:=20}"           # a job preempted this often stops requeueing itself
: "${SRUN_ARGS:=}"                # more srun options for the launch, e.g. a container (pyxis):
                                  # "--container-image=... --container-mounts=/data,/scratch"

log() { printf '%s [batch %s] %s\n' "$(date +%H:%M:%S)" "${SLURM_JOB_ID:-?}" "$*"; }
die() { log "error: $*" >&2; exit 2; }

# Ranks per node: GPUS_PER_NODE, else what Slurm allocated on this (the first) node.
gpus_per_node() {
    local count
    if [ -n "$GPUS_PER_NODE" ]; then
        count=$GPUS_PER_NODE
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        count=$SLURM_GPUS_ON_NODE
    elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        count=${SLURM_GPUS_PER_NODE##*:}        # "8" or "mi300x:8"
    elif [ -n "${SLURM_JOB_GPUS:-}" ]; then
        local -a ids
        IFS=, read -r -a ids <<<"$SLURM_JOB_GPUS"  # "0,1,2,3"
        count=${#ids[@]}
    else
        die "no GPU count: request GPUs (#SBATCH --gpus-per-node=8) or set GPUS_PER_NODE"
    fi
    case $count in
        '' | *[!0-9]* | 0) die "GPUs per node must be a positive integer, got '$count'" ;;
    esac
    echo "$count"
}

# CPUs the launch step's one task gets on every node: CPUS_PER_NODE, else the smallest node's
# count in SLURM_JOB_CPUS_PER_NODE ("128(x2),64"), else SLURM_CPUS_ON_NODE; empty if none.
# Given to srun explicitly: since Slurm 22.05 srun no longer inherits the batch script's
# --cpus-per-task, and where tasks are bound to their CPUs one task would get one core, for
# every rank and DataLoader worker of the node (Lightning #18650).
cpus_per_node() {
    local count="" entry
    local -a entries=()
    if [ -n "$CPUS_PER_NODE" ]; then
        entries=("$CPUS_PER_NODE")
    elif [ -n "${SLURM_JOB_CPUS_PER_NODE:-}" ]; then
        IFS=, read -r -a entries <<<"$SLURM_JOB_CPUS_PER_NODE"
    elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
        entries=("$SLURM_CPUS_ON_NODE")
    fi
    for entry in ${entries[@]+"${entries[@]}"}; do
        entry=${entry%%(*}                     # "128(x2)" -> 128
        case $entry in
            '' | *[!0-9]* | 0) die "CPUs per node must be a positive integer, got '$entry'" ;;
        esac
        if [ -z "$count" ] || [ "$entry" -lt "$count" ]; then
            count=$entry
        fi
    done
    echo "$count"
}

# The env-*.sh file every node sources before its ranks start; empty for none.
gpu_env_file() {
    local platform=$GPU_PLATFORM
    if [ "$platform" = auto ]; then
        if [ -e /dev/kfd ]; then
            platform=rocm
        elif [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then
            platform=cuda
        else
            platform=none
        fi
    fi
    case $platform in
        rocm | cuda) echo "$PROJECT_DIR/slurm/env-$platform.sh" ;;
        none) echo "" ;;
        *) die "GPU_PLATFORM must be rocm, cuda, none or auto, got '$GPU_PLATFORM'" ;;
    esac
}

# A port per job, so jobs sharing a node do not collide; below Linux's ephemeral range.
derived_port() { echo $((15000 + ${1:?job id} % 15000)); }

# A per-node log name from an srun filename pattern, as srun expands it for node $1 on host $2.
node_log_path() {
    local name=$NODE_LOG
    name=${name//%x/"${SLURM_JOB_NAME:-}"}
    name=${name//%j/"${SLURM_JOB_ID:-}"}
    name=${name//%A/"${SLURM_ARRAY_JOB_ID:-}"}
    name=${name//%a/"${SLURM_ARRAY_TASK_ID:-}"}
    name=${name//%n/"$1"}
    name=${name//%N/"$2"}
    echo "$LOG_DIR/$name"
}

# The metrics table the main rank printed as the job's final words. It is in the log of
# whichever node holds global rank 0: c10d assigns ranks in the order the nodes join, so that
# is not always node 0. With several (a requeued job appends), the newest log's last table.
print_metrics_table() {
    local node_log newest=""
    local -a node_logs
    mapfile -t node_logs < <(compgen -G "$(node_log_path '*' '*')")
    for node_log in ${node_logs[@]+"${node_logs[@]}"}; do
        if grep -q '^images/s  ' "$node_log" && { [ -z "$newest" ] || [ "$node_log" -nt "$newest" ]; }; then
            newest=$node_log
        fi
    done
    if [ -z "$newest" ]; then
        log "no metrics table in the per-node logs"
        return 0
    fi
    awk '/^model  / { table = $0; next }
         table != "" && /^(dataset|images|errors|top-1|top-5|images\/s|accuracy)  / {
             table = table "\n" $0 }
         END { if (table != "") print table }' "$newest"
}

# The line of this run's per-node logs that says why the job failed: a rank's one-line error
# ("batch-classify: ..." for a mistake in the input or the config, "failed: ..." otherwise; not
# the other ranks' "another rank of the job failed"), with the log it is in.
failure_reason() {
    local node_log line
    local -a node_logs
    mapfile -t node_logs < <(compgen -G "$(node_log_path '*' '*')")
    for node_log in ${node_logs[@]+"${node_logs[@]}"}; do
        # (a requeued job's node logs hold every run: only the last, from its "node N of M" line)
        line=$(awk '/^node [0-9]+ of [0-9]+ / { found = "" }
                    found == "" && (/^batch-classify: / || / ERROR batch_classify[a-z_.]*: failed: /) \
                        && !/another rank of the job/ { found = $0 }
                    END { if (found != "") print found }' "$node_log")
        if [ -n "$line" ]; then
            echo "$line ($node_log)"
            return 0
        fi
    done
    echo "the per-node logs say why ($(node_log_path '<n>' '<host>'))"
}

# Whether a node of this run said its ranks stopped because the output filesystem is full or
# failing (launch-node.sh; status 74). Read from the logs: srun reports the highest status of
# its tasks, which is that of a node stopped after the failing one (143) where there are several.
output_fault_reported() {
    local node_log run=$((${SLURM_RESTART_COUNT:-0} + 1))
    local -a node_logs
    mapfile -t node_logs < <(compgen -G "$(node_log_path '*' '*')")
    for node_log in ${node_logs[@]+"${node_logs[@]}"}; do
        if grep -q "(run $run): output filesystem fault" "$node_log"; then
            return 0
        fi
    done
    return 1
}

# Stop the running step gracefully: SIGTERM to every process of the job's steps (launchers and
# ranks; never the batch shell). Not `kill -TERM <srun>`: srun answers SIGTERM by SIGKILLing its
# tasks ("forcing job termination"), which would lose the ranks' chance to commit their work.
stop_step() {
    local reason=$1
    [ -n "${step_pid:-}" ] || return 0
    stopping=1
    log "$reason: sending SIGTERM to the ranks (scancel --signal=TERM $SLURM_JOB_ID)"
    if ! scancel --signal=TERM "$SLURM_JOB_ID"; then
        log "scancel failed; stopping srun itself (its tasks get SIGKILL, committed units stay)"
        kill -TERM "$step_pid" 2>/dev/null || true
    fi
}

# Sets job_state and job_restarts to this job's JobState and Restarts as the controller sees
# them, "?" where it cannot be asked. Not in a $(...) subshell: that would die of the SIGTERM
# Slurm sends while it ends the job, leaving nothing.
read_job_state() {
    local info
    info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || info=
    job_state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info" | head -n1)
    job_restarts=$(sed -n 's/.*Restarts=\([0-9][0-9]*\).*/\1/p' <<<"$info" | head -n1)
    : "${job_state:=?}" "${job_restarts:=?}"
}

# Whether Slurm has requeued this job since this run started (scontrol requeue, preemption, a
# lost node): Restarts is already counted up while the job is being ended.
requeued_by_slurm_now() {
    local attempt
    for attempt in 1 2 3; do
        read_job_state
        if [ "$job_restarts" != "?" ]; then
            [ "$job_restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]
            return
        fi
        sleep "$attempt"
    done
    return 1
}

# SIGUSR1: `#SBATCH --signal=B:USR1@...` near the time limit, or a site's preemption notice. It
# reaches this shell only: stop the ranks, then requeue (see classify_main).
on_usr1() {
    trapped=1
    [ -n "${step_pid:-}" ] || return 0
    preempted=1
    stop_step "SIGUSR1 (time limit near, or preemption)"
}

# SIGTERM: Slurm is ending the job (scancel, scontrol requeue, preemption with
# PreemptMode=REQUEUE or CANCEL, a failed node, the time limit) and sent it to every process of
# the job: the ranks have it already and commit their finished units. Nothing to forward: while
# Slurm ends the job it answers scancel "Job can not be altered now", and scancel retries until
# the job's KillWait SIGKILLs this shell. Only a SIGTERM sent to this shell alone (the job still
# RUNNING: scancel --batch --signal=TERM) is passed on to the ranks.
on_term() {
    trapped=1
    [ -n "${step_pid:-}" ] || return 0
    read_job_state
    if [ "$job_state" = RUNNING ] || [ "$job_state" = "?" ]; then
        stop_step "SIGTERM to the batch shell"
        return 0
    fi
    stopping=1
    if [ "$job_restarts" != "?" ] && [ "$job_restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]; then
        requeued_by_slurm=1
        log "SIGTERM: Slurm is requeueing the job (scontrol requeue, preemption or a failed node);" \
            "the ranks got it too and commit their finished units"
    else
        log "SIGTERM: Slurm is ending the job (scancel or its time limit, state $job_state); the" \
            "ranks got it too and commit their finished units"
    fi
}

# Run one classification job on the allocation: <config> [--section.key value ...].
classify_main() {
    if [ $# -lt 1 ] || [ "${1#--}" != "$1" ]; then
        die "usage: sbatch [options] $0 <config.yaml> [--section.key value ...]"
    fi
    local config=$1
    shift
    : "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
    [ -f "$PROJECT_DIR/jobs/classify.py" ] \
        || die "no jobs/classify.py under PROJECT_DIR=$PROJECT_DIR: submit from the project root or set PROJECT_DIR"
    [ -f "$config" ] || die "config file '$config' not found (relative to $PWD)"

    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local per_node processes first_host port backend cpus
    per_node=$(gpus_per_node)
    cpus=$(cpus_per_node)
    processes=$((nodes * per_node))
    # (`|| true`: head may close the pipe before scontrol has printed a long node list.)
    first_host=$({ scontrol show hostnames "$SLURM_JOB_NODELIST" || true; } | head -n1)
    [ -n "$first_host" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    port=${MAIN_PROCESS_PORT:-$(derived_port "$SLURM_JOB_ID")}
    backend=${RDZV_BACKEND:-$([ "$nodes" -gt 1 ] && echo c10d || echo static)}
    # Read on every node by launch-node.sh (srun passes the environment on).
    export PYTHON RDZV_BACKEND=$backend JOB_LOCAL_DIR="$NODE_LOCAL_DIR/batch-classify-$SLURM_JOB_ID"
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}  # log lines as they happen, not per 8 KB
    GPU_ENV_FILE=$(gpu_env_file)
    export GPU_ENV_FILE

    # --quiet: a failed rank's own error and traceback are in the node log; without it the
    # launcher adds a traceback of its own and repeats the rank's output in it.
    local -a srun_args launcher=(--quiet --config_file "$PROJECT_DIR/slurm/accelerate.yaml"
        --num_machines "$nodes" --num_processes "$processes"
        --main_process_ip "${MAIN_PROCESS_IP:-$first_host}" --main_process_port "$port"
        --rdzv_backend "$backend")
    # accelerate starts N real ranks only with --multi_gpu (also on the CPU); it refuses it for one.
    if [ "$processes" -gt 1 ]; then
        launcher=(--multi_gpu "${launcher[@]}")
    fi
    read -r -a srun_args <<<"$SRUN_ARGS"

    mkdir -p "$LOG_DIR"
    log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) run $((${SLURM_RESTART_COUNT:-0} + 1)):" \
        "$nodes node(s) x $per_node rank(s) = $processes, rendezvous $backend at" \
        "${MAIN_PROCESS_IP:-$first_host}:$port, env ${GPU_ENV_FILE:-none}"
    log "config $config, overrides: $*"
    log "launch step: 1 task per node with ${cpus:-the default number of} CPU(s)" \
        "(srun --cpus-per-task); each rank sizes its threads and workers from its affinity" \
        "mask, capped by the allocation"
    log "per-node logs: $(node_log_path '<n>' '<host>')"

    preempted=0
    requeued_by_slurm=0
    stopping=0
    step_pid=
    trap on_usr1 USR1
    trap on_term TERM
    srun --nodes="$nodes" --ntasks-per-node=1 ${cpus:+"--cpus-per-task=$cpus"} \
        --kill-on-bad-exit=1 --open-mode=append \
        --output="$LOG_DIR/$NODE_LOG" ${srun_args[@]+"${srun_args[@]}"} \
        "$PROJECT_DIR/slurm/launch-node.sh" "${launcher[@]}" \
        "$PROJECT_DIR/jobs/classify.py" --config "$config" "$@" &
    step_pid=$!

    local status
    while :; do
        trapped=0
        status=0
        wait "$step_pid" || status=$?
        # `wait` returns early (status > 128) when a trapped signal arrives; the step runs on.
        [ "$trapped" = 1 ] || break
    done
    step_pid=  # from here on a late signal stops nothing (and, trapped, does not kill this shell)
    log "step ended with status $status"

    if [ -n "${GPU_ENV_FILE}" ]; then
        srun --nodes="$nodes" --ntasks-per-node=1 rm -rf "$JOB_LOCAL_DIR" \
            || log "could not remove $JOB_LOCAL_DIR on every node"
    fi

    if [ "$status" = 0 ] && [ "$stopping" = 1 ]; then
        # launch-node.sh reports ranks stopped on request as a clean exit, so that srun
        # --kill-on-bad-exit leaves the other nodes to finish their batch: 0 after a stop means
        # stopped (or finished at that very moment: a requeued run then finds every unit
        # committed and only writes the results).
        status=75
    fi
    if [ "$status" = 0 ]; then
        log "done. Metrics:"
        print_metrics_table
        return 0
    fi
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$status" = 74 ] || { [ "$status" != 0 ] && output_fault_reported; }; then
        # Full, over quota or failing: a requeued run would stop the same way. Committed units stay.
        log "the output filesystem is full or failing (status 74; the per-node logs say where):" \
            "not requeueing. Free space and submit the same command again: it finishes the rest"
        return 74
    fi
    if [ "$preempted" = 1 ]; then
        # The ranks committed their finished units; the requeued job runs this same command and
        # resumes where they stopped (it keeps its job id, so its logs append to these).
        if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
            log "preempted, not requeued: requeued $restarts of $MAX_REQUEUES times already" \
                "(MAX_REQUEUES); finished units are committed: submit the same command to resume"
            return 75
        fi
        if scontrol requeue "$SLURM_JOB_ID"; then
            log "preempted, requeued ($((restarts + 1)) of $MAX_REQUEUES): the requeued run resumes"
            return 0
        fi
        log "preempted, but the requeue failed: submit the same command again to resume"
        return 75
    fi
    if [ "$requeued_by_slurm" = 1 ]; then
        log "stopped, finished units committed; Slurm requeued the job (restart $((restarts + 1))):" \
            "the requeued run resumes from the committed units"
        return 75
    fi
    if [ "$stopping" = 1 ] && { [ "$status" = 75 ] || [ "$status" = 143 ]; }; then
        log "stopped, finished units committed; not requeued: submit the same command to resume"
        return 75
    fi
    if requeued_by_slurm_now; then
        # The ranks failed because a node was lost (its ranks gone, the rendezvous store maybe
        # with them), and Slurm, setting the node DOWN, requeued the job (#SBATCH --requeue).
        log "the run ended early: $(failure_reason)"
        log "Slurm requeued the job (restart $job_restarts; a lost node, scontrol requeue or" \
            "preemption): the requeued run resumes from the committed units"
        return "$status"
    fi
    log "the job failed: $(failure_reason)"
    return "$status"
}
