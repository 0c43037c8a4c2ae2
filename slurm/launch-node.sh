#!/usr/bin/env bash
# One task per node, started by `srun` from slurm/common.sh: prepare this node, then exec
# `accelerate launch`, which starts this node's ranks. Usage (from srun only):
#   launch-node.sh <accelerate launch options> <script> <script args>
#
# This node's machine rank is read HERE, on the node. Expanded in the batch shell instead,
# $SLURM_NODEID is the batch node's 0 on every node: each claims machine rank 0 and the
# rendezvous fails (accelerate #2816; SLURM_PROCID is not it either, accelerate #1645).
set -euo pipefail
: "${SLURM_NODEID:?launch-node.sh runs under srun, one task per node}"

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
    "CUDA=${CUDA_VISIBLE_DEVICES-unset}"
exec "${PYTHON:-python3}" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" \
    ${rendezvous[@]+"${rendezvous[@]}"} "$@"
