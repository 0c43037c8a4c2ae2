#!/usr/bin/env python3
"""A stand-in for `$PYTHON -m accelerate.commands.launch ...`, to test the batch scripts' launch
line and logs in a second instead of a real job's ten. Point PYTHON at this file.

FAKE_LAUNCH picks what every node's "launcher" does:
  ok    print a metrics table (from the node named by FAKE_MAIN_NODE, default 0) and exit 0
  full  wait for SIGTERM or SIGUSR1 (the job being stopped); the ranks' last commits then find
        the output filesystem full: they leave 74 in $BATCH_CLASSIFY_STATUS_FILE and the
        launcher exits 1, as torchrun does for a failed rank
Each writes its arguments to $SLURM_STUB_STATE/launch-<node id>.json once it is ready, and its
CPUs (affinity mask, SLURM_CPUS_ON_NODE, SLURM_CPUS_PER_TASK) to cpus-<node id>.json. How real
launchers stop, fail and get requeued is tested under a real Slurm: tests/run/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

TABLE = """model     fake-model
dataset   /fake (imagefolder)
images    11
errors    0
top-1     50.00%
top-5     90.00%
images/s  1.0"""


def main() -> int:
    mode = os.environ.get("FAKE_LAUNCH", "ok")
    node = os.environ["SLURM_NODEID"]
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda number, _frame: received.append(number))
    ready = Path(os.environ["SLURM_STUB_STATE"]) / f"launch-{node}.json"
    # What the ranks would size their threads and workers from.
    (ready.parent / f"cpus-{node}.json").write_text(json.dumps(
        {"affinity": sorted(os.sched_getaffinity(0)), "cpus_on_node": os.environ.get("SLURM_CPUS_ON_NODE"),
         "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK")}))
    ready.write_text(json.dumps(sys.argv[1:]))
    print(f"fake launcher on node {node}: {mode}", flush=True)
    if mode == "full":
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        Path(os.environ["BATCH_CLASSIFY_STATUS_FILE"]).write_text("74\n")
        return 1
    if node == os.environ.get("FAKE_MAIN_NODE", "0"):
        print(TABLE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
