# shellcheck shell=bash
# NVIDIA (CUDA) environment for the ranks of one node. launch-node.sh sources it on every node,
# before `accelerate launch` starts the ranks (GPU_PLATFORM=cuda, or auto on a node with
# /dev/nvidiactl or nvidia-smi). The counterpart of env-rocm.sh.
#
# PyTorch: the default PyPI wheels are CUDA builds (pip install torch torchvision), or an NGC
# container. With docker:
#   docker run --gpus all --ipc=host --shm-size 16G -v "$PWD:/work" nvcr.io/nvidia/pytorch:<tag>
# (DataLoader workers pass decoded batches through /dev/shm: docker's 64 MB default is far too
# small). Under Slurm with pyxis/enroot: srun --container-image=... (the host's /dev/shm).

# Per-job scratch on the node's own disk (kernel caches of torch.compile/triton, if ever used),
# so ranks of different jobs never share a cache on a network home.
_job_dir="${JOB_LOCAL_DIR:-${NODE_LOCAL_DIR:-${SLURM_TMPDIR:-/tmp}}/batch-classify-${SLURM_JOB_ID:-$$}}"
export TRITON_CACHE_DIR="$_job_dir/triton-cache"
mkdir -p "$TRITON_CACHE_DIR"
unset _job_dir

# GPU visibility is Slurm's: its GRES plugin sets CUDA_VISIBLE_DEVICES to this job's GPUs on this
# node, and accelerate gives each rank its GPU through LOCAL_RANK. Set nothing here.

# NCCL. This job's collectives are tiny (a barrier, one gather of timings), so the defaults do;
# for a site's fabric, the usual knobs:
# export NCCL_SOCKET_IFNAME=ib0           # the interfaces between nodes (also GLOO_SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5_0,mlx5_1        # the InfiniBand adapters to use
# export NCCL_DEBUG=WARN                  # INFO to see the rings, transports and interfaces
