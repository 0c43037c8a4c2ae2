"""Ranks, devices and CPU budgets: one place that knows the process topology."""

from __future__ import annotations

import datetime
import logging
import os

import torch
from accelerate import PartialState

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not usable here."""


def init_state(device: str, timeout_s: int) -> PartialState:
    """Join the job's process group (or run alone), on the GPUs or on the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "runtime.device is 'cuda' but PyTorch sees no GPU (torch.cuda.is_available() is "
            "False; ROCm builds report their GPUs as cuda too). Use runtime.device auto or cpu."
        )
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu, timeout=datetime.timedelta(seconds=timeout_s))


def available_cores() -> int:
    """Cores this process may run on: Slurm's allocation, else the affinity mask."""
    if os.environ.get("SLURM_CPUS_ON_NODE"):
        return max(1, int(os.environ["SLURM_CPUS_ON_NODE"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cores_per_rank(local_world_size: int) -> int:
    return max(1, available_cores() // max(1, local_world_size))


def plan_cpu(state: PartialState, num_workers: int | None) -> tuple[int, int]:
    """(intra-op threads, DataLoader workers) for this rank, sized so ranks don't oversubscribe."""
    cores = cores_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if state.device.type == "cpu":
        # The model needs the cores; one worker decodes ahead while the model runs.
        threads = cores
        workers = 1 if num_workers is None else num_workers
    else:
        threads = min(4, cores)
        workers = max(1, min(16, cores - 1)) if num_workers is None else num_workers
    return threads, workers


def configure_logging(rank: int, is_main: bool) -> None:
    """Log lines prefixed with the rank; ranks other than the main one log warnings only."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
