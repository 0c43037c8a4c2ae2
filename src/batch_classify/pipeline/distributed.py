"""Ranks, devices and CPU budgets: one place that knows the process topology."""

from __future__ import annotations

import ctypes
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
from accelerate import PartialState

from batch_classify.core.errors import UserError
from batch_classify.core.secrets import redact_logs

log = logging.getLogger(__name__)


class DeviceError(UserError, RuntimeError):
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


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_ON_NODE", "")
    return max(1, int(value)) if value.isdigit() else None


def available_cores() -> int:
    """Cores this process may actually run on: its affinity mask, capped by Slurm's count.

    Slurm's count alone is not enough: an srun task is often bound to the CPUs of its step,
    which without ``--cpus-per-task`` can be one core (Slurm 22.05+ no longer passes the
    batch script's on to srun), and sizing threads from the allocation then piles every
    rank and worker onto it.
    """
    slurm = _slurm_cpus()
    return _affinity() if slurm is None else min(slurm, _affinity())


def cpu_mask_warning() -> str | None:
    """A warning where the affinity mask is at most half of Slurm's allocation on the node."""
    slurm, mask = _slurm_cpus(), _affinity()
    if slurm is None or mask * 2 > slurm:
        return None
    return (f"this process may run on {mask} CPU(s) (its affinity mask) but Slurm allocated "
            f"{slurm} on the node (SLURM_CPUS_ON_NODE): threads and DataLoader workers are sized "
            f"for {mask}. The launch step was probably bound to too few CPUs: give srun "
            f"--cpus-per-task={slurm} (slurm/common.sh does) or --cpu-bind=none")


def cores_per_rank(local_world_size: int) -> int:
    return max(1, available_cores() // max(1, local_world_size))


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_host_memory(device: torch.device, enabled: bool) -> str | None:
    """On a CPU rank, make glibc keep freed memory for reuse; returns what it did, or None.

    By default glibc serves each big block (an activation tensor) with a fresh mmap and
    unmaps it when freed, so every forward pass page-faults its activations back in; it
    also trims the heap top. Serving every block from the heap and never trimming makes
    later batches reuse the same pages: Lite0 alone ran at 150 img/s instead of 100 on the
    2-core test machine (docs/benchmarks.md). The process keeps its peak memory.
    """
    if device.type != "cpu" or not enabled:
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    if mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
        return "glibc malloc: no mmap, no trimming (runtime.keep_host_memory)"
    return None


def plan_cpu(state: PartialState, num_workers: int | None) -> tuple[int, int]:
    """(intra-op threads, DataLoader workers) for this rank, sized so ranks don't oversubscribe."""
    cores = cores_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    warning = cpu_mask_warning()
    if warning is not None and os.environ.get("LOCAL_RANK", "0") == "0":  # once per node
        log.warning("%s", warning)
    if state.device.type == "cpu":
        # The model needs the cores. No worker process: the rank's threads decode each batch
        # between forward passes (loader.ThreadedBatches), so decoding never preempts one of
        # the model's intra-op threads mid-operation; 8-14% faster than one worker on the
        # 2-core test machine (docs/benchmarks.md).
        threads = cores
        workers = 0 if num_workers is None else num_workers
    else:
        # The GPU runs the model: the rank's cores decode, keeping one for the main process.
        threads = min(2, cores)
        workers = max(1, min(32, cores - 1)) if num_workers is None else num_workers
    return threads, workers


@dataclass(frozen=True)
class Resources:
    """What one rank works with: its device, its intra-op threads and its DataLoader workers."""

    device: torch.device
    threads: int = 1
    workers: int = 0

    @classmethod
    def plan(cls, state: PartialState, num_workers: int | None) -> Resources:
        threads, workers = plan_cpu(state, num_workers)
        return cls(state.device, threads, workers)


CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 64


def default_batch_size(device) -> int:
    """Measured on Lite0 (docs/benchmarks.md): 16 beats 32 on the CPU, where the activations
    of bigger batches fall out of cache; a GPU wants bigger batches."""
    return CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE


def configure_logging(rank: int, is_main: bool) -> None:
    """Log lines prefixed with the rank; ranks other than the main one log warnings only."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    redact_logs()  # no credential in a log line (core/secrets.py)


def default_store():
    """The rendezvous store of the process group, or None when running alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a backend without a store
        return None


class RankFailed(RuntimeError):
    """Another rank of this job failed or stopped; the message carries its reason, ``detail``
    what a rank stopped by its output filesystem published (core/faults.OutputFault.detail)."""

    def __init__(self, message: str, detail: dict | None = None):
        super().__init__(message)
        self.detail = detail


class JobBoard:
    """End-of-job coordination through the rendezvous store instead of collectives.

    A rank that is still waiting for its peers keeps checking its stop flag and the peers'
    failures, so a stop signal or a crashed rank never leaves it hanging in a collective;
    ``timeout_s`` bounds the wait for a rank that vanished without a word (SIGKILL).
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, poll_s: float = 0.2,
                 namespace: str = "batch_classify/"):
        self.store = store
        self.namespace = namespace
        """Prefix of every key of this run: a process that runs several jobs (bench) uses one each."""
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def _key(self, name: str) -> str:
        return self.namespace + "board/" + name

    def report_failure(self, reason: str, detail: dict | None = None) -> None:
        """Tell the other ranks why this one is leaving (best effort: the store may be gone).
        ``detail``: a fault of the output filesystem; the first one published stays."""
        if self.store is None:
            return
        try:
            if detail is not None and not self.store.check([self._key("fault")]):
                self.store.set(self._key("fault"), json.dumps(detail))
            self.store.set(self._key("failure"), f"rank {self.rank}: {reason}"[:2000])
            self.store.add(self._key("failures"), 1)
        except Exception:  # the store's host may already be gone; the timeout still bounds
            log.debug("could not publish the failure of rank %d", self.rank)

    def fault(self) -> dict | None:
        """The output-filesystem fault a rank of this job published, if any (best effort)."""
        if self.store is None:
            return None
        try:
            if self.store.check([self._key("fault")]):
                return json.loads(self.store.get(self._key("fault")))
        except Exception:  # the store's host may be gone
            log.debug("could not read the job's fault from the store")
        return None

    def _raise_if_failed(self, stop) -> None:
        if stop is not None and stop.requested:
            from batch_classify.core.preemption import Preempted

            raise Preempted()
        if self.store.add(self._key("failures"), 0) > 0:
            reason = self.store.get(self._key("failure")).decode()
            raise RankFailed(f"another rank of the job failed or stopped: {reason}", self.fault())

    def _wait_for(self, counter: str, target: int, what: str, stop,
                  timeout_s: float | None = None) -> None:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while self.store.add(self._key(counter), 0) < target:
            self._raise_if_failed(stop)
            if time.monotonic() > deadline:
                raise RankFailed(f"timed out after {timeout_s:.0f} s waiting for {what} "
                                 "(runtime.timeout_s); a rank may have died")
            time.sleep(self.poll_s)

    def announce(self, stage: str) -> None:
        """Main rank: ``stage`` is done (e.g. the input is listed, the output folder ready)."""
        if self.store is not None:
            self.store.add(self._key(f"stage/{stage}"), 1)

    def wait_for_main(self, stage: str, stop) -> None:
        """Other ranks: wait until the main rank announced ``stage``, or failed."""
        if self.store is not None and self.rank != 0:
            self._wait_for(f"stage/{stage}", 1, f"the main rank ({stage})", stop)

    def finish(self, payload: dict, stop) -> list[dict] | None:
        """Publish this rank's payload; the main rank gets every rank's, in rank order."""
        if self.store is None:
            return [payload]
        self.store.set(self._key(f"payload/{self.rank}"), json.dumps(payload))
        self.store.add(self._key("finished"), 1)
        if self.rank != 0:
            return None
        self._wait_for("finished", self.world_size, "every rank to finish its units", stop)
        return [json.loads(self.store.get(self._key(f"payload/{r}"))) for r in range(self.world_size)]

    def release(self, stop) -> None:
        """Main rank: results written. Others: wait for that, so rank 0's store outlives them."""
        if self.store is None:
            return
        if self.rank == 0:
            self.store.add(self._key("released"), 1)
            # Leave only once every rank has seen the release (rank 0 may host the store), but
            # the results are written: a rank that vanished now costs a warning, not the job.
            try:
                self._wait_for("left", self.world_size - 1, "the other ranks to leave", None,
                               timeout_s=min(self.timeout_s, 60.0))
            except RankFailed as error:
                log.warning("results are written; %s", error)
        else:
            self._wait_for("released", 1, "the main rank to write the results", stop)
            self.store.add(self._key("left"), 1)
