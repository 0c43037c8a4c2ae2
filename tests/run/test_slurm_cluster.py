"""The Slurm scripts under a real Slurm: Debian's slurm-wlm 22.05, started on this machine by
slurm/local-cluster.sh (munge, slurmctld and three slurmd nodes n1-n3, GPUs as GRES).

Every scenario submits the project's own sbatch scripts, unchanged, with `sbatch` and only the
site variables set (PYTHON, GPUS_PER_NODE=1, GPU_PLATFORM=none, and PROJECT_DIR because jobs are
submitted from a temporary folder): one CPU rank per node, a tiny checkpoint, 11 images in units
of 2. The command line adds what a scenario needs (-N, --time, --signal, --array) and
--exclusive=user, so that the scenarios share the nodes. The scenarios run side by side: a fixture
submits them all and drives each from its own thread (a stalled read holds a job mid-run until
the driver has signalled it, as tests/stall.py does for the other tests); each test then checks
what its scenario ended as, with `scontrol show job` (no accounting database here, so no sacct),
`batch-classify verify`, and the predictions of a one-process run of the same config.

Needs root and the packages (apt-get install slurm-wlm munge; .ci/run installs them); skipped
otherwise. Run alone: python -m pytest tests/run/test_slurm_cluster.py (or -m slurm);
SLURM_SCENARIOS=usr1,lost-node runs only those scenarios. With SLURM_SCENARIO_TABLE=<file> the
scenarios' table (state, restarts, exit code, time) is written there. Where a test failed, the
cluster's folder (its logs, the jobs' logs and outputs) is kept, and its path printed.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, make_corpus, read_rows, run_job
from stall import HOOK, Stall

pytestmark = pytest.mark.slurm

SLURM = ROOT / "slurm"
LOCAL_CLUSTER = SLURM / "local-cluster.sh"
JOB_ARGS = ["--output.unit_size", "2", "--runtime.batch_size", "1", "--runtime.device", "cpu"]
# Units 0-4 hold items 0-9; the read of the last item (unit 5) stalls while a scenario needs it.
UNITS_BEFORE_THE_STALL = 5
# The node a scenario loses; every other scenario runs on n1 and n2.
LOST_NODE = "n3"
# Nodes of 32 "GPUs": four 8-GPU jobs at a time per node (each node of a job: about 1.4 GB of
# launcher and rank), which bounds the memory the scenarios take side by side.
GPUS_PER_NODE = 32
SLURMD_TIMEOUT_S = 20  # a killed slurmd's node is DOWN after this, and its jobs requeued
LOST_NODE_TIMEOUT_S = 120  # runtime.timeout_s of the job that loses a node
SCENARIO_TIMEOUT_S = 480
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TABLE_ROWS = ("model", "dataset", "images", "errors", "top-1", "top-5", "images/s")


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["topk_ids"], [round(s, 5) for s in r["topk_scores"]], r["error"])
            for k, r in rows.items()}


def _unavailable() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "a local Slurm cluster needs root on Linux (slurmd starts jobs as their users)"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
               if shutil.which(c, path=path) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge "
                "(.ci/run installs them)")
    return None


def _free_ports(count: int) -> int:
    """A first port of `count` consecutive ports that are free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 30000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError("no free ports for the local Slurm cluster")


def _field(record: str, key: str) -> str | None:
    match = re.search(rf"(?:^|\s){key}=(\S*)", record)
    return match.group(1) if match else None


class Cluster:
    """slurm/local-cluster.sh's cluster in a temporary folder, and the commands to use it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.submit_dir = folder / "submit"
        (self.submit_dir / "logs").mkdir(parents=True)
        self.control_env = {**os.environ, "LOCAL_SLURM_DIR": str(folder / "cluster"),
                            "LOCAL_SLURM_NODES": "3", "LOCAL_SLURM_GPUS": str(GPUS_PER_NODE),
                            "LOCAL_SLURM_CPUS": "64", "LOCAL_SLURM_PORT": str(_free_ports(4)),
                            "LOCAL_SLURM_SLURMD_TIMEOUT": str(SLURMD_TIMEOUT_S)}
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        # The submitting shell: nothing of a Slurm job this process may itself run in.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "SALLOC_"))
                    and k not in ("GPUS_PER_NODE", "GPU_PLATFORM", "ROCR_VISIBLE_DEVICES",
                                  "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}
        self.env.update(PATH=path, SLURM_CONF=str(folder / "cluster" / "slurm.conf"))

    def control(self, command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_CLUSTER), command, *args], capture_output=True,
                              text=True, env=self.control_env, timeout=180)

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}")
        return result.stdout

    def sbatch(self, args: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                                env={**self.env, **env}, cwd=self.submit_dir, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {result.stdout}{result.stderr}")
        return result.stdout.strip().split(";")[0]

    def records(self, job_id: str) -> list[str]:
        """`scontrol show job` of a job (of each task of an array), one line each."""
        return self.run("scontrol", "-o", "show", "job", job_id).splitlines()

    def job(self, job_id: str) -> dict[str, str]:
        record = self.records(job_id)[0]
        return {key: _field(record, key) or "" for key in
                ("JobId", "JobState", "Reason", "Restarts", "ExitCode", "NodeList", "RunTime")}

    def completing(self, job_id: str) -> bool:
        """Whether the job's processes are still ending (its batch script may still be logging)."""
        return "COMPLETING" in self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)

    def slurmctld_log(self) -> str:
        path = self.folder / "cluster" / "log" / "slurmctld.log"
        return path.read_text()[-4000:] if path.exists() else ""


@dataclass
class Job:
    """One submitted job of a scenario: its id, output folder, stalled read and logs."""

    cluster: Cluster
    name: str
    args: list[str]
    env: dict[str, str]
    output: Path
    stall: Stall | None
    job_id: str = ""
    submitted: float = 0.0
    history: list[dict] = field(default_factory=list)

    def submit(self) -> Job:
        self.job_id = self.cluster.sbatch(self.args, self.env)
        self.submitted = time.monotonic()
        return self

    def state(self) -> dict[str, str]:
        return self.cluster.job(self.job_id)

    def log(self) -> str:
        path = self.cluster.submit_dir / "logs" / f"classify-{self.job_id}.out"
        return path.read_text() if path.exists() else ""

    def node_logs(self) -> dict[int, str]:
        logs = {}
        for path in (self.cluster.submit_dir / "logs").glob(f"classify-{self.job_id}-node*.out"):
            logs[int(re.search(r"-node(\d+)-", path.name).group(1))] = path.read_text()
        return logs

    def diagnostics(self) -> str:
        nodes = "\n".join(f"== node {n}\n{text[-3000:]}" for n, text in sorted(self.node_logs().items()))
        return (f"\n== job {self.job_id} ({self.name}): {self.state()}\n== job log\n{self.log()}\n"
                f"{nodes}\n== slurmctld.log (end)\n{self.cluster.slurmctld_log()}")

    def committed_units(self) -> int:
        return len(list((self.output / "predictions").glob("unit-*.parquet")))

    def wait(self, ready: Callable[[dict[str, str]], bool], what: str,
             timeout: float = SCENARIO_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if ready(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what} did not happen within {timeout:.0f} s"
                                     + self.diagnostics())
            time.sleep(0.5)

    def wait_mid_run(self) -> None:
        """Until the job committed its first units and holds the last one at the stalled read."""
        def ready(state: dict[str, str]) -> bool:
            if state["JobState"] in FINAL_STATES:
                raise AssertionError(f"{self.name}: ended before the stalled read" + self.diagnostics())
            return self.stall.reached and self.committed_units() >= UNITS_BEFORE_THE_STALL
        self.wait(ready, "reaching the stalled read")

    def wait_requeued(self, restarts: int) -> dict[str, str]:
        """Until the job is back in the queue after its `restarts`-th requeue; snapshot it."""
        state = self.wait(lambda s: s["JobState"] == "PENDING" and int(s["Restarts"]) >= restarts,
                          f"requeue {restarts}")
        self.history.append({**state, "log": self.log(), "units": self.committed_units()})
        return state

    def start_now(self) -> None:
        """Skip the delay Slurm puts before a requeued job runs again (BeginTime, ~2 min).

        Not in the second of the requeue: the nodes revoked the job's credential then, and a
        launch with a credential from that same second is refused ("Job credential revoked"),
        which ends the job FAILED.
        """
        time.sleep(2)
        self.cluster.run("scontrol", "update", f"JobId={self.job_id}", "StartTime=now", check=False)

    def wait_final(self, release_requeues: bool = True) -> dict[str, str]:
        """Until the job has ended; a job that requeues itself again is let run at once."""
        def ready(state: dict[str, str]) -> bool:
            if release_requeues and state["JobState"] == "PENDING" and state["Reason"] == "BeginTime":
                self.start_now()
            return state["JobState"] in FINAL_STATES and not self.cluster.completing(self.job_id)
        state = self.wait(ready, "the end of the job")
        state["elapsed_s"] = round(time.monotonic() - self.submitted)
        return state


class Scenarios:
    """Everything the scenarios share: the cluster, the corpus, the config, the stall hook."""

    def __init__(self, cluster: Cluster, corpus: Path, config: Path, folder: Path):
        self.cluster = cluster
        self.corpus = corpus
        self.config = config
        self.folder = folder
        self.hook = folder / "stall-hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(HOOK)
        self.stalled_name = sorted(p.name for p in corpus.rglob("*.*"))[-1]

    def job(self, name: str, script: str, options: list[str], *overrides: str, stall: bool = False,
            env: dict[str, str] | None = None) -> Job:
        output = self.folder / "out" / name
        site = {"PYTHON": sys.executable, "GPUS_PER_NODE": "1", "GPU_PLATFORM": "none",
                "PROJECT_DIR": str(ROOT),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                            os.environ.get("PYTHONPATH")]))}
        gate = None
        if stall:
            gate = self.folder / f"stall-{name}"
            gate.touch()
            site.update(PYTHONPATH=f"{self.hook}{os.pathsep}{site['PYTHONPATH']}",
                        STALL_NAME=self.stalled_name, STALL_WHILE=str(gate))
        args = ["--exclusive=user", *options, str(SLURM / script), str(self.config), *JOB_ARGS,
                "--output.dir", str(output), *overrides]
        return Job(self.cluster, name, args, {**site, **(env or {})}, output,
                   Stall(gate) if gate else None)


# --- the scenarios: each runs in its own thread and returns what the tests check ----------------

def _plain(scenarios: Scenarios, name: str, script: str, options: list[str]) -> dict:
    job = scenarios.job(name, script, options).submit()
    return {"job": job, "final": job.wait_final(release_requeues=False)}


def _usr1_preemption(scenarios: Scenarios) -> dict:
    """scancel --signal=USR1 --batch mid-run (what a site's preemption notice does)."""
    job = scenarios.job("usr1", "multi-node.sbatch", ["-N", "2", f"--exclude={LOST_NODE}"],
                        stall=True).submit()
    job.wait_mid_run()
    job.cluster.run("scancel", "--signal=USR1", "--batch", job.job_id)
    job.wait_requeued(1)
    job.stall.release()
    job.start_now()
    return {"job": job, "final": job.wait_final()}


def _time_limit(scenarios: Scenarios) -> dict:
    """The time limit itself: --signal=B:USR1@100 of --time=3 (Slurm's timer has ~30 s of slack)."""
    job = scenarios.job("time-limit", "single-node.sbatch",
                        ["--time=3", "--signal=B:USR1@100", f"--exclude={LOST_NODE}"],
                        stall=True).submit()
    job.wait_requeued(1)
    reached = job.stall.reached
    job.stall.release()
    job.start_now()
    return {"job": job, "final": job.wait_final(), "stall_reached_before_the_signal": reached}


def _max_requeues(scenarios: Scenarios) -> dict:
    """MAX_REQUEUES=1: the second preemption is not requeued."""
    job = scenarios.job("max-requeues", "single-node.sbatch", [f"--exclude={LOST_NODE}"],
                        stall=True, env={"MAX_REQUEUES": "1"}).submit()
    job.wait_mid_run()
    job.cluster.run("scancel", "--signal=USR1", "--batch", job.job_id)
    job.wait_requeued(1)
    Path(f"{job.stall.gate}.waiting").unlink()
    job.start_now()
    job.wait_mid_run()
    job.cluster.run("scancel", "--signal=USR1", "--batch", job.job_id)
    final = job.wait_final(release_requeues=False)
    job.stall.release()
    return {"job": job, "final": final}


def _outside_requeue(scenarios: Scenarios) -> dict:
    """scontrol requeue from outside: an administrator, or PreemptMode=REQUEUE."""
    job = scenarios.job("scontrol-requeue", "single-node.sbatch", [f"--exclude={LOST_NODE}"],
                        stall=True).submit()
    job.wait_mid_run()
    job.cluster.run("scontrol", "requeue", job.job_id)
    job.wait_requeued(1)
    job.stall.release()
    job.start_now()
    return {"job": job, "final": job.wait_final()}


def _cancelled(scenarios: Scenarios) -> dict:
    """A plain scancel: the job ends, not requeued; the same sbatch again finishes the rest."""
    job = scenarios.job("scancel", "single-node.sbatch", [f"--exclude={LOST_NODE}"],
                        stall=True).submit()
    job.wait_mid_run()
    job.cluster.run("scancel", job.job_id)
    cancelled = job.wait_final(release_requeues=False)
    cancelled_log = job.log()
    job.stall.release()
    again = Job(job.cluster, "scancel, submitted again", job.args, job.env, job.output, None).submit()
    again.submitted = job.submitted  # the scenario's time: from the first sbatch
    return {"job": job, "cancelled": cancelled, "cancelled_log": cancelled_log,
            "again": again, "final": again.wait_final(release_requeues=False)}


def _lost_node(scenarios: Scenarios) -> dict:
    """A node lost mid-job: its slurmd and every process of the step on it killed."""
    # On n2 and n3 (the batch shell on n2): n1 and n2 carry the other scenarios.
    job = scenarios.job("lost-node", "multi-node.sbatch", ["-N", "2", "--exclude=n1"],
                        "--runtime.timeout_s", str(LOST_NODE_TIMEOUT_S), stall=True).submit()
    job.wait_mid_run()
    killed = job.cluster.control("kill-node", LOST_NODE)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    job.stall.release()
    # Not until the time limit (4 h): within runtime.timeout_s the run has ended (COMPLETING
    # while the lost node cannot confirm it), then the job is requeued or over.
    job.wait(lambda s: s["JobState"] not in ("RUNNING", "CONFIGURING"),
             "the end of the run that lost a node", timeout=LOST_NODE_TIMEOUT_S)
    after = job.wait(lambda s: s["JobState"] == "PENDING" or s["JobState"] in FINAL_STATES,
                     "the job back in the queue or ended")
    after = {**after, "log": job.log()}
    if after["JobState"] in FINAL_STATES:
        first = job
        job = Job(job.cluster, "lost-node, submitted again", job.args, job.env, job.output,
                  None).submit()
        job.submitted = first.submitted
    else:
        # The requeued run goes to healthy nodes, as a scheduler sends it while the lost node is
        # down. (Run at once on the node just brought back, under the same job id, its launcher
        # there got a SIGTERM 40 s in, likely Slurm's late cleanup of the run the node lost.)
        job.cluster.run("scontrol", "update", f"JobId={job.job_id}", f"ExcNodeList={LOST_NODE}")
    final = job.wait_final()
    started = job.cluster.control("start")  # brings the node back
    assert started.returncode == 0, started.stdout + started.stderr
    return {"job": job, "after_the_loss": after, "final": final,
            "node_back": job.cluster.run("sinfo", "-h", "-n", LOST_NODE, "-o", "%T").strip()}


def _label_array(scenarios: Scenarios) -> dict:
    """label-array.sbatch over three collections, the second one missing."""
    other = shutil.copytree(scenarios.corpus, scenarios.folder / "collection-b")
    missing = scenarios.folder / "no-such-collection"
    collections = scenarios.folder / "collections.txt"
    collections.write_text(f"# three collections\n{scenarios.corpus}\n{missing}\n\n{other}\n")
    root = scenarios.folder / "out" / "labels"
    site = scenarios.job("unused", "label-array.sbatch", []).env
    args = ["--exclusive=user", "--array=0-2", f"--exclude={LOST_NODE}",
            str(SLURM / "label-array.sbatch"), str(collections), str(root), str(scenarios.config),
            *JOB_ARGS]
    cluster = scenarios.cluster
    started = time.monotonic()
    array_id = cluster.sbatch(args, site)
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    while True:
        tasks = {int(_field(r, "ArrayTaskId")): {k: _field(r, k) for k in
                                                  ("JobId", "JobState", "Restarts", "ExitCode")}
                 for r in cluster.records(array_id) if (_field(r, "ArrayTaskId") or "").isdigit()}
        if (len(tasks) == 3 and all(t["JobState"] in FINAL_STATES for t in tasks.values())
                and not cluster.completing(array_id)):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"the array did not end: {tasks}")
        time.sleep(0.5)
    logs = {index: (cluster.submit_dir / "logs" / f"label-{array_id}_{index}.out").read_text()
            for index in tasks}
    node_logs = {index: "".join(p.read_text() for p in (cluster.submit_dir / "logs").glob(
        f"label-{array_id}_{index}-node*.out")) for index in tasks}
    return {"array": array_id, "tasks": tasks, "logs": logs, "node_logs": node_logs,
            "root": root, "missing": missing, "other": other,
            "elapsed_s": round(time.monotonic() - started)}


SCENARIOS: dict[str, Callable[[Scenarios], dict]] = {
    # The longest first (the lost node's SlurmdTimeout, Slurm's time-limit timer); then the jobs
    # that hold nothing up; the stalled jobs while they run.
    "lost-node": _lost_node,
    "time-limit": _time_limit,
    "multi-node": lambda s: _plain(s, "multi-node", "multi-node.sbatch",
                                   ["-N", "2", f"--exclude={LOST_NODE}"]),
    "single-node": lambda s: _plain(s, "single-node", "single-node.sbatch",
                                    [f"--exclude={LOST_NODE}"]),
    "label-array": _label_array,
    "usr1": _usr1_preemption,
    "scontrol-requeue": _outside_requeue,
    "scancel": _cancelled,
    "max-requeues": _max_requeues,
}


@pytest.fixture(scope="module")
def cluster(request) -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's 0700 temporary folder: munged runs as the munge user and must reach it.
    folder = Path(tempfile.mkdtemp(prefix="batch-classify-slurm-"))
    folder.chmod(0o755)
    local = Cluster(folder)
    failed_before = request.session.testsfailed
    started = local.control("start")
    # Stops the cluster should this process die without its teardown (a CI timeout's SIGKILL).
    reaper = subprocess.Popen(
        ["bash", "-c", f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; '
                       f'exec bash "{LOCAL_CLUSTER}" stop'],
        env=local.control_env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        if started.returncode != 0:
            message = f"the local Slurm cluster did not start:\n{started.stdout}{started.stderr}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
        yield local
    finally:
        stopped = local.control("stop")
        reaper.kill()
        reaper.wait()
        if request.session.testsfailed > failed_before:
            # The jobs' logs and the daemons' are what tells why.
            print(f"\nthe local Slurm cluster's logs, jobs' logs and outputs are kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def outcomes(cluster, tiny_models) -> Iterator[dict[str, Future]]:
    """Every scenario, started at once, each in its own thread; the tests wait for theirs."""
    folder = cluster.folder / "work"
    folder.mkdir()
    corpus = make_corpus(folder / "corpus", seed=3)
    config = folder / "job.yaml"
    config.write_text(f"model:\n  name: {tiny_models['efficientnet']}\n"
                      f"data:\n  path: {corpus}\noutput:\n  dir: {folder / 'unused'}\n")
    scenarios = Scenarios(cluster, corpus, config, folder)
    chosen = [n for n in os.environ.get("SLURM_SCENARIOS", "").split(",") if n] or list(SCENARIOS)
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS) + 1, thread_name_prefix="scenario")
    futures = {name: pool.submit(SCENARIOS[name], scenarios) for name in chosen}

    def reference() -> dict:
        output = folder / "out" / "one-process"
        run_job(["--config", str(config), *JOB_ARGS, "--output.dir", str(output)])
        return {"rows": _predictions(read_rows(output)), "corpus": corpus}
    futures["reference"] = pool.submit(reference)
    try:
        yield futures
    finally:
        pool.shutdown(wait=True)
        table = os.environ.get("SLURM_SCENARIO_TABLE")
        if table:
            Path(table).write_text(_scenario_table(futures))


# What each scenario does, for the table of docs/slurm.md.
WHAT = {
    "multi-node": "`sbatch -N 2 multi-node.sbatch`",
    "single-node": "`sbatch single-node.sbatch`",
    "usr1": "`multi-node.sbatch` on 2 nodes, `scancel --signal=USR1 --batch` mid-run",
    "time-limit": "`single-node.sbatch --time=3 --signal=B:USR1@100`, held mid-run until signalled",
    "max-requeues": "`MAX_REQUEUES=1`, `scancel --signal=USR1 --batch` mid-run in run 1 and run 2",
    "scontrol-requeue": "`scontrol requeue` mid-run",
    "scancel": "`scancel` mid-run, then the same `sbatch` again",
    "lost-node": "`multi-node.sbatch` on n2+n3, `local-cluster.sh kill-node n3` mid-run "
                 f"(SlurmdTimeout {SLURMD_TIMEOUT_S} s, runtime.timeout_s {LOST_NODE_TIMEOUT_S}); "
                 "the requeued run on healthy nodes",
}


def _scenario_table(futures: dict[str, Future]) -> str:
    lines = ["| scenario | what the test does | ended as | restarts | exit code | time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, future in futures.items():
        if name == "reference" or future.exception() is not None:
            continue
        outcome = future.result()
        if name == "label-array":
            for index, task in sorted(outcome["tasks"].items()):
                what = ("`label-array.sbatch --array=0-2`, " +
                        ("a missing path" if index == 1 else "a folder of 11 images"))
                lines.append(f"| label-array task {index} | {what} | {task['JobState']} "
                             f"| {task['Restarts']} | {task['ExitCode']} | {outcome['elapsed_s']} s |")
            continue
        final = outcome["final"]
        ended = final["JobState"]
        if name == "scancel":
            cancelled = outcome["cancelled"]
            ended = (f"{cancelled['JobState']} (exit {cancelled['ExitCode']}), submitted again: "
                     f"{ended}")
        elif name == "lost-node":
            ended = f"requeued by Slurm ({outcome['after_the_loss']['JobState']}), then {ended}"
        elif name == "max-requeues":
            ended = f"requeued by the script (1 of 1), then {ended}, not requeued (MAX_REQUEUES)"
        elif name in ("usr1", "time-limit", "scontrol-requeue") and int(final["Restarts"]):
            who = "Slurm" if name == "scontrol-requeue" else "the script"
            ended = f"requeued by {who}, then {ended}"
        lines.append(f"| {name} | {WHAT[name]} | {ended} | {final['Restarts']} | {final['ExitCode']} "
                     f"| {final['elapsed_s']} s |")
    return "\n".join(lines) + "\n"


# --- the checks --------------------------------------------------------------------------------

def _outcome(outcomes: dict[str, Future], name: str) -> dict:
    if name not in outcomes:
        pytest.skip(f"scenario {name} not in SLURM_SCENARIOS")
    return outcomes[name].result(timeout=SCENARIO_TIMEOUT_S + 60)


def _check_complete(output: Path, reference: dict, env: dict[str, str]) -> None:
    """Every image exactly once (read_rows fails on a repeated id), the one-process predictions,
    and `batch-classify verify` clean."""
    assert _predictions(read_rows(output)) == reference["rows"]
    verify = subprocess.run([sys.executable, "-m", "batch_classify", "verify", str(output)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]})
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "complete" in verify.stdout


def _table_at_end(log: str) -> list[str]:
    return [line.split()[0] for line in log.rstrip("\n").splitlines()[-len(TABLE_ROWS):]]


def _completed(outcome: dict, restarts: int | None = None) -> Job:
    job = outcome["job"] if "again" not in outcome else outcome["again"]
    final = outcome["final"]
    assert final["JobState"] == "COMPLETED", job.diagnostics()
    assert final["ExitCode"] == "0:0"
    if restarts is not None:
        assert int(final["Restarts"]) == restarts, job.diagnostics()
    assert _table_at_end(job.log()) == list(TABLE_ROWS), job.log()
    return job


def test_multi_node_job_on_two_nodes_matches_one_process(outcomes):
    job = _completed(_outcome(outcomes, "multi-node"), restarts=0)
    reference = _outcome(outcomes, "reference")
    _check_complete(job.output, reference, job.env)
    assert job.state()["NodeList"] == "n[1-2]"
    nodes = job.node_logs()
    assert sorted(nodes) == [0, 1]
    for node, text in nodes.items():
        assert f"node {node} of 2" in text and f"machine rank {node}," in text
        # The GRES of `#SBATCH --gpus-per-node=8` reached the ranks as Slurm sets it.
        assert "ROCR=0,1,2,3,4,5,6,7" in text or re.search(r"ROCR=(\d+,){7}\d+ ", text), text
    assert "rendezvous c10d at n1:" in job.log()


def test_single_node_job_matches_one_process(outcomes):
    job = _completed(_outcome(outcomes, "single-node"), restarts=0)
    _check_complete(job.output, _outcome(outcomes, "reference"), job.env)
    assert "rendezvous static" in job.log()


def test_usr1_mid_run_stops_every_node_requeues_and_the_requeued_run_finishes(outcomes):
    outcome = _outcome(outcomes, "usr1")
    job = _completed(outcome, restarts=1)
    _check_complete(job.output, _outcome(outcomes, "reference"), job.env)
    stopped = job.history[0]
    assert stopped["units"] == UNITS_BEFORE_THE_STALL
    first_run = stopped["log"]
    assert "SIGUSR1 (time limit near, or preemption)" in first_run
    assert "preempted, requeued (1 of 20)" in first_run
    # Each node's launcher answers the SIGTERM with 143 (torchrun), which launch-node.sh reports
    # as a stop: srun's --kill-on-bad-exit never ended a node still finishing its batch.
    assert "Terminating StepId" not in first_run, first_run
    for node, text in job.node_logs().items():
        assert "the ranks stopped on request (SIGTERM)" in text, (node, text)
    log = job.log()
    assert "run 1:" in log and "run 2:" in log
    assert any("resuming: 10 of 11 items already committed" in text
               for text in job.node_logs().values())


def test_time_limit_signal_requeues_and_restarts_count_the_requeues(outcomes):
    outcome = _outcome(outcomes, "time-limit")
    job = _completed(outcome)
    _check_complete(job.output, _outcome(outcomes, "reference"), job.env)
    log = job.log()
    requeues = log.count("preempted, requeued (")
    assert requeues >= 1 and int(outcome["final"]["Restarts"]) == requeues, log
    assert log.count("SIGUSR1 (time limit near, or preemption)") == requeues
    assert "TIMEOUT" not in job.state()["JobState"]
    if outcome["stall_reached_before_the_signal"]:
        assert "resuming: 10 of 11 items already committed" in "".join(job.node_logs().values())


def test_max_requeues_stops_requeueing(outcomes):
    outcome = _outcome(outcomes, "max-requeues")
    job, final = outcome["job"], outcome["final"]
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "75:0", job.diagnostics()
    assert final["Restarts"] == "1"
    log = job.log()
    assert "preempted, requeued (1 of 1)" in log
    assert "preempted, not requeued: requeued 1 of 1 times already (MAX_REQUEUES)" in log
    # What was committed stays, once each; the rest is for the same command submitted again.
    rows = read_rows(job.output)
    assert len(rows) == 10 and job.committed_units() == UNITS_BEFORE_THE_STALL
    reference = _outcome(outcomes, "reference")["rows"]
    assert _predictions(rows) == {k: v for k, v in reference.items() if k in rows}
    assert not (job.output / "metrics.json").exists()


def test_scontrol_requeue_from_outside_is_slurms_requeue_not_the_scripts(outcomes):
    outcome = _outcome(outcomes, "scontrol-requeue")
    job = _completed(outcome, restarts=1)
    _check_complete(job.output, _outcome(outcomes, "reference"), job.env)
    first_run = job.history[0]["log"]
    assert "SIGTERM: Slurm is requeueing the job" in first_run
    assert "Slurm requeued the job (restart 1)" in first_run
    # The script neither requeued on top nor blocked in scancel until KillWait.
    assert "preempted" not in first_run and "scancel" not in first_run.split("run 1:")[1], first_run
    assert "resuming: 10 of 11 items already committed" in "".join(job.node_logs().values())


def test_scancel_is_not_requeued_and_the_same_sbatch_finishes_the_rest(outcomes):
    outcome = _outcome(outcomes, "scancel")
    cancelled = outcome["cancelled"]
    assert cancelled["JobState"] == "CANCELLED" and cancelled["Restarts"] == "0"
    assert "not requeued: submit the same command to resume" in outcome["cancelled_log"]
    assert "requeued (" not in outcome["cancelled_log"]
    again = _completed(outcome, restarts=0)
    _check_complete(again.output, _outcome(outcomes, "reference"), again.env)
    assert "resuming: 10 of 11 items already committed" in "".join(again.node_logs().values())


def test_a_lost_node_does_not_hang_the_job_and_nothing_is_lost_or_doubled(outcomes):
    outcome = _outcome(outcomes, "lost-node")
    after = outcome["after_the_loss"]
    # Slurm set the node DOWN after SlurmdTimeout and requeued the job (#SBATCH --requeue); the
    # surviving node's ranks got its SIGTERM and committed their finished units.
    assert after["JobState"] == "PENDING" and after["Restarts"] == "1", after
    # Its log says so, whether the SIGTERM came first (the batch shell may then be killed at
    # KillWait while srun still waits for the lost node) or the ranks' failure (the lost node may
    # have held the rendezvous store).
    assert ("SIGTERM: Slurm is requeueing the job" in after["log"]
            or "Slurm requeued the job (restart 1" in after["log"]), after["log"]
    assert "the job failed" not in after["log"], after["log"]
    job = _completed(outcome, restarts=1)
    _check_complete(job.output, _outcome(outcomes, "reference"), job.env)
    assert outcome["node_back"] == "idle"  # local-cluster.sh start brought the lost node back


def test_label_array_two_collections_done_and_the_missing_one_failed_in_one_line(outcomes):
    outcome = _outcome(outcomes, "label-array")
    tasks, logs, root = outcome["tasks"], outcome["logs"], outcome["root"]
    assert {i: t["JobState"] for i, t in tasks.items()} == {0: "COMPLETED", 1: "FAILED",
                                                            2: "COMPLETED"}, logs
    reference = _outcome(outcomes, "reference")
    site = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for index in (0, 2):
        _check_complete(root / f"{index:05d}", reference, site)
        assert _table_at_end(logs[index]) == list(TABLE_ROWS)
    failure = [line for line in logs[1].splitlines() if "the job failed" in line]
    assert len(failure) == 1 and f"data.path {outcome['missing']} does not exist" in failure[0], logs[1]
    assert "Traceback" not in logs[1] and "Traceback" not in outcome["node_logs"][1]
    assert not list(root.glob("00001/predictions/unit-*"))
