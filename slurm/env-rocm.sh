# shellcheck shell=bash
# ROCm (AMD MI300X, MI250) environment for the ranks of one node. launch-node.sh sources it on
# every node, before `accelerate launch` starts the ranks (GPU_PLATFORM=rocm, or auto on a node
# with /dev/kfd). Sourcing it by hand is fine too: `source slurm/env-rocm.sh`.
#
# PyTorch for ROCm: the ROCm wheel index, e.g.
#   pip install torch torchvision --index-url https://download.pytorch.org/whl/rocm6.4
# or the rocm/pytorch container. With docker:
#   docker run --device=/dev/kfd --device=/dev/dri --group-add=video --ipc=host \
#       --shm-size 16G --security-opt seccomp=unconfined -v "$PWD:/work" rocm/pytorch:latest
# (DataLoader workers pass decoded batches through /dev/shm: docker's 64 MB default is far too
# small, hence --shm-size or --ipc=host). Under Slurm with pyxis/enroot:
#   srun --container-image=rocm/pytorch:latest --container-mounts="$PWD:/work" ...
# or with Apptainer: apptainer exec --rocm docker://rocm/pytorch:latest ...
# (both use the host's /dev/shm, so no --shm-size there).

# MIOpen keeps a user DB and a kernel cache under ~/.config/miopen and ~/.cache/miopen. On a
# shared home many ranks corrupt or lock them ("database disk image is malformed", MIOpen
# #1878): give each job its own, on a node-local disk, created before any rank starts.
_miopen_base="${JOB_LOCAL_DIR:-${NODE_LOCAL_DIR:-${SLURM_TMPDIR:-/tmp}}/batch-classify-${SLURM_JOB_ID:-$$}}"
export MIOPEN_USER_DB_PATH="$_miopen_base/miopen-db"
export MIOPEN_CUSTOM_CACHE_DIR="$_miopen_base/miopen-cache"
mkdir -p "$MIOPEN_USER_DB_PATH" "$MIOPEN_CUSTOM_CACHE_DIR"
unset _miopen_base
# FAST: quick start-up for some kernel speed; NORMAL searches (and caches) the best kernels.
export MIOPEN_FIND_MODE="${MIOPEN_FIND_MODE:-FAST}"

# GPU visibility is Slurm's: its GRES plugin sets ROCR_VISIBLE_DEVICES to the GPUs of this job
# on this node. HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES (which HIP also reads) index only
# the devices ROCr exposes, so a value set beside it (by a site's Slurm for "CUDA" GRES, by a
# module, by hand) that names physical ids can hide every GPU. accelerate gives each rank its
# GPU through LOCAL_RANK; nothing else is needed.
if [ -n "${ROCR_VISIBLE_DEVICES:-}" ]; then
    for _var in HIP_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES; do
        if [ -n "${!_var:-}" ]; then
            echo "env-rocm.sh: unsetting $_var=${!_var}: ROCR_VISIBLE_DEVICES=$ROCR_VISIBLE_DEVICES decides" >&2
            unset "$_var"
        fi
    done
    unset _var
fi

# RCCL (it reads the NCCL_* names). This job's collectives are tiny (a barrier, one gather of
# timings), so the defaults do; for a site's fabric, the usual knobs:
# export NCCL_SOCKET_IFNAME=hsn0,ib0      # the interfaces between nodes (also GLOO_SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5_0,mlx5_1        # the InfiniBand/RoCE adapters to use
# export NCCL_IB_GID_INDEX=3              # RoCE v2
# export NCCL_NET_GDR_LEVEL=3             # GPU-direct RDMA distance
# export NCCL_DEBUG=WARN                  # INFO to see the rings, transports and interfaces
# export RCCL_MSCCL_ENABLE=0              # if MSCCL algorithms misbehave on a ROCm release
# export HSA_FORCE_FINE_GRAIN_PCIE=1      # seen in RCCL tuning advice for some RDMA setups
