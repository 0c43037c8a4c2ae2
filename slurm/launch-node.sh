#!/usr/bin/env bash
# One task per node, started by `srun` from slurm/common.sh: prepare this node, then run
# `accelerate launch`, which starts this node's ranks. Usage (from srun only):
#   launch-node.sh <accelerate launch options> <script> <script args>
#
# This node's machine rank is read HERE, on the node. Expanded in the batch shell instead,
# $SLURM_NODEID is the batch node's 0 on every node: each claims machine rank 0 and the
# rendezvous fails (accelerate #2816; SLURM_PROCID is not it either, accelerate #1645).
set -euo pipefail
: "${SLURM_NODEID:?launch-node.sh runs under srun, one task per node}"

# The stop signals (SIGTERM, SIGUSR1: scancel from the batch script) reach every process of the
# step, this shell too: noted here, acted on by the ranks. See the end for why this shell stays.
trap 'stop_signal=TERM' TERM
trap 'stop_signal=USR1' USR1
stop_signal=

if [ -n "${GPU_ENV_FILE:-}" ]; then
    # shellcheck source=/dev/null  # env-rocm.sh or env-cuda.sh, chosen by the batch script
    source "$GPU_ENV_FILE"
fi

rendezvous=()
if [ "${RDZV_BACKEND:-}" = c10d ]; then
    # Exactly one launcher hosts the c10d store: machine rank 0, on the allocation's first host
    # (the --main_process_ip). Left to guess, torch hosts it wherever the ip looks local: none
    # on a multi-homed node whose name resolves to another interface, and whichever launcher
    # binds first when several share a host.
    is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)
    rendezvous=(--rdzv_conf "is_host=$is_host")
fi

echo "node $SLURM_NODEID of ${SLURM_NNODES:-1} ($(hostname)): machine rank $SLURM_NODEID," \
    "rendezvous ${RDZV_BACKEND:-static}, GPU env ${GPU_ENV_FILE:-none}," \
    "visible GPUs: ROCR=${ROCR_VISIBLE_DEVICES-unset} HIP=${HIP_VISIBLE_DEVICES-unset}" \
    "CUDA=${CUDA_VISIBLE_DEVICES-unset}; CPUs: $(nproc) in the affinity mask," \
    "${SLURM_CPUS_ON_NODE:-?} allocated on the node"

if [ -n "$stop_signal" ]; then
    echo "node $SLURM_NODEID: SIG$stop_signal before the launch: not starting the ranks"
    exit 0
fi
# Not `exec`: ranks stopped on request exit 75, and srun --kill-on-bad-exit answers the first
# non-zero task exit by SIGTERM, then SIGKILL, to every other node's tasks, which may still be
# finishing their batch and committing it (a process already on its way out, its default
# SIGTERM action back, dies of it). So this node reports such a stop as a clean exit, 0; the
# batch script knows it asked for the stop. Any other status still ends the step everywhere.
#
# The launcher's own status after a stop is not 75: the SIGTERM reaches it too, and it answers
# by stopping its ranks and exiting 128 + 15 = 143 itself (torchrun, for several ranks: "Received
# 15 death signal, shutting down workers", after up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s, for
# them; accelerate's single-process launcher after 5 s). Real Slurm shows 143 on every node.
status=0
# --- output filesystem faults (README "When things go wrong") ---------------------------------
# A rank stopped by its output filesystem (full, over quota, failing) exits 74, but the launcher
# reports any failed rank as 1: the ranks also leave their status in this node-local file, and
# this node then says so in its log for the batch script, which must not requeue such a job.
export BATCH_CLASSIFY_STATUS_FILE="${TMPDIR:-/tmp}/batch-classify-status-${SLURM_JOB_ID:-0}-$SLURM_NODEID-$$"
rm -f "$BATCH_CLASSIFY_STATUS_FILE"
"${PYTHON:-python3}" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" \
    ${rendezvous[@]+"${rendezvous[@]}"} "$@" || status=$?
rank_status=
if [ -s "$BATCH_CLASSIFY_STATUS_FILE" ]; then
    read -r rank_status <"$BATCH_CLASSIFY_STATUS_FILE" || true
fi
rm -f "$BATCH_CLASSIFY_STATUS_FILE"
if [ "$status" != 0 ] && [ "$rank_status" = 74 ]; then
    echo "node $SLURM_NODEID (run $((${SLURM_RESTART_COUNT:-0} + 1))): output filesystem fault:" \
        "the ranks stopped because the output filesystem is full or failing (status 74)"
    exit 74
fi
# ----------------------------------------------------------------------------------------------
if [ "$status" = 75 ] || { [ -n "$stop_signal" ] && [ "$status" = 143 ]; }; then
    echo "node $SLURM_NODEID: the ranks stopped on request${stop_signal:+ (SIG$stop_signal)}" \
        "with their finished units committed (launcher status $status): task exits 0"
    exit 0
fi
exit "$status"
