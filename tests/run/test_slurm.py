"""The Slurm scripts (slurm/) as files and in pieces, and what a local Slurm cannot show, under
stub Slurm commands (tests/slurm_stubs).

The scenarios themselves (whole jobs, preemption, requeues, a lost node, job arrays) run under a
real Slurm in tests/run/test_slurm_cluster.py. The stubs emulate an allocation whose "nodes" are all
this host, for what that cluster does not exercise: the order in which nodes join, global rank 0
on another node, srun binding tasks to CPUs (task/affinity), the launch line's options.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, make_corpus, read_rows, run_job

SLURM = ROOT / "slurm"
STUBS = ROOT / "tests" / "slurm_stubs"
SCRIPTS = sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh")])
# Every job here: units of 2 items, one image per forward pass, on the CPU.
JOB_ARGS = ["--output.unit_size", "2", "--runtime.batch_size", "1", "--runtime.device", "cpu"]
METRIC_KEYS = ("n", "n_errors", "top1", "top5")
TABLE_ROWS = ("model", "dataset", "images", "errors", "top-1", "top-5", "images/s")
JOB_TIMEOUT_S = 150


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["topk_ids"], [round(s, 5) for s in r["topk_scores"]], r["error"])
            for k, r in rows.items()}


def _metrics(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in METRIC_KEYS}


def _clean_environ() -> dict[str, str]:
    """This process's environment without any Slurm job it may itself be running in."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))
            and k not in ("GPUS_PER_NODE", "GPU_PLATFORM", "ROCR_VISIBLE_DEVICES",
                          "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}


def _free_job_id() -> str:
    """A job id whose derived rendezvous port (15000 + id % 15000) is free right now."""
    rng = random.Random()
    for _ in range(100):
        job_id = rng.randint(100000, 999999)
        with socket.socket() as probe:
            try:
                probe.bind(("", 15000 + job_id % 15000))
            except OSError:
                continue
        return str(job_id)
    raise RuntimeError("no free port for a job id")


class Cluster:
    """A stub Slurm installation in a temporary folder: submit folder, logs, stub state."""

    def __init__(self, base: Path, **settings: str):
        self.submit_dir = base / "submit"
        (self.submit_dir / "logs").mkdir(parents=True)
        self.state = base / "slurm-state"
        self.node_local = base / "node-local"
        self.env = {**_clean_environ(),
                    "PATH": f"{STUBS}{os.pathsep}{os.environ['PATH']}",
                    "SLURM_STUB_STATE": str(self.state), "PROJECT_DIR": str(ROOT),
                    "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
                    "GPUS_PER_NODE": "1", "GPU_PLATFORM": "none",
                    "NODE_LOCAL_DIR": str(self.node_local), **settings}

    @contextlib.contextmanager
    def submitted(self, args: list[str], job_id: str) -> Iterator[subprocess.Popen]:
        """`sbatch <args>` (the stub runs the job at once); everything it started ends after."""
        process = subprocess.Popen([str(STUBS / "sbatch"), *args], cwd=self.submit_dir,
                                   env={**self.env, "SLURM_STUB_JOB_ID": job_id},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            yield process
        finally:
            # The batch shell and srun share sbatch's process group; each task has its own.
            groups = [process.pid]
            for record in (self.state / "steps").glob("*.*"):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    groups += [int(pgid) for pgid in record.read_text().split()]
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            process.wait()
            process.stdout.close()

    def run(self, args: list[str], job_id: str) -> subprocess.CompletedProcess:
        with self.submitted(args, job_id) as process:
            try:
                output, _ = process.communicate(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"sbatch {args} ran over {JOB_TIMEOUT_S} s\n{self.logs()}")
        return subprocess.CompletedProcess(args, process.returncode, output)

    def log(self, name: str) -> str:
        return (self.submit_dir / "logs" / name).read_text()

    def logs(self) -> str:
        return "\n".join(f"== {path.name}\n{path.read_text()}"
                         for path in sorted((self.submit_dir / "logs").iterdir()))

    def record(self, name: str) -> list[str]:
        path = self.state / name
        return path.read_text().splitlines() if path.exists() else []

    def calls(self, command: str) -> list[list[str]]:
        return [call["argv"] for call in map(json.loads, self.record("calls.jsonl"))
                if call["command"] == command]


def _table_at_end(log: str) -> list[str]:
    """The log's last lines, as many as the metrics table has rows."""
    return [line.split()[0] for line in log.rstrip("\n").splitlines()[-len(TABLE_ROWS):]]


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> dict:
    """An 11-image job and its single-process result, for the Slurm runs to match."""
    base = tmp_path_factory.mktemp("slurm-reference")
    corpus = make_corpus(base / "corpus", seed=3)
    config = base / "job.yaml"
    config.write_text(f"model:\n  name: {tiny_models['efficientnet']}\n"
                      f"data:\n  path: {corpus}\noutput:\n  dir: {base / 'unused'}\n")
    output = base / "single-process"
    run_job(["--config", str(config), *JOB_ARGS, "--output.dir", str(output)])
    return {"corpus": corpus, "config": config, "rows": _predictions(read_rows(output)),
            "metrics": _metrics(output)}


# --- the scripts as files --------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        message = "shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(["shellcheck", "--external-sources", *map(str, SCRIPTS)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_scripts_are_executable_and_ask_for_requeue_and_a_warning_signal():
    for script in SLURM.glob("*.sbatch"):
        text = script.read_text()
        assert os.access(script, os.X_OK), script.name
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text, script.name
        assert "#SBATCH --output=logs/%x-" in text, script.name


# --- pieces of the scripts -------------------------------------------------------------------------

def _bash(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; {code}"], capture_output=True,
                          text=True, cwd=ROOT, env={**_clean_environ(), **env}, timeout=30)


@pytest.mark.parametrize(("env", "expected"), [
    ({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "4"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "mi300x:4"}, "4"),
    ({"SLURM_JOB_GPUS": "0,1,5"}, "3"),
])
def test_gpus_per_node_from_the_setting_else_the_allocation(env, expected):
    result = _bash("source slurm/common.sh; gpus_per_node", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("env", [{}, {"GPUS_PER_NODE": "eight"}, {"GPUS_PER_NODE": "0"}])
def test_no_usable_gpu_count_stops_the_job_with_a_reason(env):
    result = _bash("source slurm/common.sh; gpus_per_node", **env)
    assert result.returncode != 0
    assert "GPUS_PER_NODE" in result.stderr or "positive integer" in result.stderr


def test_rocm_env_makes_per_job_miopen_dirs_and_leaves_gpus_to_slurm(tmp_path):
    show = ('source slurm/env-rocm.sh; echo "$MIOPEN_USER_DB_PATH|$MIOPEN_CUSTOM_CACHE_DIR|'
            '${ROCR_VISIBLE_DEVICES:-}|${HIP_VISIBLE_DEVICES:-unset}|${CUDA_VISIBLE_DEVICES:-unset}"')
    result = _bash(show, SLURM_JOB_ID="4242", NODE_LOCAL_DIR=str(tmp_path),
                   ROCR_VISIBLE_DEVICES="4,5", HIP_VISIBLE_DEVICES="4,5", CUDA_VISIBLE_DEVICES="4,5")
    assert result.returncode == 0, result.stderr
    user_db, cache, rocr, hip, cuda = result.stdout.strip().split("|")
    job_dir = tmp_path / "batch-classify-4242"
    assert Path(user_db).parent == job_dir and Path(cache).parent == job_dir and user_db != cache
    assert Path(user_db).is_dir() and Path(cache).is_dir()
    assert (rocr, hip, cuda) == ("4,5", "unset", "unset")
    assert "unsetting HIP_VISIBLE_DEVICES" in result.stderr

    # Without ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES is the only selection: it stays.
    result = _bash(show, SLURM_JOB_ID="4243", NODE_LOCAL_DIR=str(tmp_path), HIP_VISIBLE_DEVICES="1")
    assert result.stdout.strip().split("|")[3] == "1"


def test_cuda_env_sources_cleanly_and_leaves_gpus_to_slurm(tmp_path):
    result = _bash('source slurm/env-cuda.sh; echo "$CUDA_VISIBLE_DEVICES"', SLURM_JOB_ID="7",
                   NODE_LOCAL_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2,3"


# --- the stubs themselves ------------------------------------------------------------------------

def _stub(command: str, *args: str, env: dict[str, str], timeout: float = 30):
    return subprocess.run([str(STUBS / command), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_scontrol_stub_expands_hostlists_and_records_requeues(tmp_path):
    env = {**_clean_environ(), "SLURM_STUB_STATE": str(tmp_path),
           "SLURM_JOB_NODELIST": "gpu[08-10,12],login1"}
    result = _stub("scontrol", "show", "hostnames", env=env)
    assert result.stdout.split() == ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    assert _stub("scontrol", "show", "hostnames", "a[1-2]-b[3-4]", env=env).stdout.split() == [
        "a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    assert _stub("scontrol", "requeue", "123", env=env).returncode == 0
    assert (tmp_path / "requeue.log").read_text().split() == ["123"]


def test_srun_stub_starts_one_task_per_node_and_handles_signals_like_srun(tmp_path):
    env = {**_clean_environ(), "SLURM_STUB_STATE": str(tmp_path), "SLURM_JOB_ID": "55",
           "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_JOB_NAME": "t"}
    show = 'echo "$SLURM_NODEID $SLURM_PROCID $SLURM_LOCALID $SLURM_NNODES $SLURMD_NODENAME"'
    result = _stub("srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", show, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["0 0 0 2 localhost", "1 1 0 2 localhost"]
    assert _stub("srun", "-N2", "bash", "-c", "exit $SLURM_NODEID", env=env).returncode == 1

    # Each task says it is ready, then reports the signal it gets.
    task = ('trap "echo USR1 on $SLURM_NODEID; exit 0" USR1; trap "echo TERM; exit 0" TERM; '
            f'touch {tmp_path}/ready-$SLURM_NODEID; while :; do sleep 0.05; done')
    for sent, expected_status, expected_lines in [
        (signal.SIGUSR1, 0, ["USR1 on 0", "USR1 on 1"]),  # forwarded to every task
        (signal.SIGTERM, 128 + signal.SIGKILL, []),          # real srun: SIGKILL, no TERM
    ]:
        for ready in tmp_path.glob("ready-*"):
            ready.unlink()
        srun = subprocess.Popen([str(STUBS / "srun"), "-N2", "--output", f"{tmp_path}/task-%n.out",
                                 "bash", "-c", task], env=env, start_new_session=True,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while len(list(tmp_path.glob("ready-*"))) < 2:
                assert time.monotonic() < deadline and srun.poll() is None
                time.sleep(0.05)
            srun.send_signal(sent)
            assert srun.wait(timeout=20) == expected_status
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(srun.pid, signal.SIGKILL)
            srun.wait()
            srun.stderr.close()
        # (The tasks' `sleep` gets the signal too: srun signals every process of the step.)
        lines = sorted(line for node in (0, 1)
                       for line in (tmp_path / f"task-{node}.out").read_text().splitlines()
                       if line.startswith(("USR1 on", "TERM")))
        assert lines == expected_lines


# --- with a fake launcher (a second per job): what a local Slurm 22.05 does not show ---------------
# Whole jobs, preemption, requeues, cancelling, a lost node and job arrays run under a real Slurm
# in tests/run/test_slurm_cluster.py. Here, what one machine's cluster does not exercise on purpose:
# the ranks joining in reverse order, global rank 0 on a node other than node 0, the launch line
# of several ranks on one node, the ROCm env file's per-job folders, and srun binding tasks to
# CPUs (task/affinity, below).

def _fake_job(tmp_path: Path, script: str = "multi-node.sbatch",
              **settings: str) -> tuple[Cluster, list[str]]:
    """A cluster whose nodes run tests/slurm_stubs/fake_launcher.py instead of accelerate."""
    cluster = Cluster(tmp_path, PYTHON=str(STUBS / "fake_launcher.py"), **settings)
    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    return cluster, [str(SLURM / script), str(config), "--output.dir", "/nowhere"]


def test_the_metrics_table_is_found_on_whichever_node_holds_rank_0(tmp_path):
    cluster, args = _fake_job(tmp_path, FAKE_MAIN_NODE="1")
    job_id = _free_job_id()
    result = cluster.run(args, job_id)
    assert result.returncode == 0, cluster.logs()
    main_log = cluster.log(f"classify-{job_id}.out")
    assert _table_at_end(main_log) == list(TABLE_ROWS), main_log
    assert "fake-model" in main_log


def test_multi_node_launch_line_and_only_node_0_hosting_the_rendezvous(tmp_path):
    # Node 1's launcher starts first: the c10d store must still be hosted by machine rank 0 only.
    cluster, args = _fake_job(tmp_path, GPU_PLATFORM="rocm", SLURM_STUB_START_ORDER="reverse")
    job_id = _free_job_id()
    result = cluster.run(args, job_id)
    assert result.returncode == 0, result.stdout + cluster.logs()
    assert f"Submitted batch job {job_id}" in result.stdout

    # The launch line: --multi_gpu for 2 CPU ranks, c10d on the first host at the job's port,
    # and no machine rank from the batch shell (each node reads its own SLURM_NODEID).
    launch = cluster.calls("srun")[0]
    assert "--multi_gpu" in launch and "--machine_rank" not in launch
    for option, value in [("--num_machines", "2"), ("--num_processes", "2"),
                          ("--main_process_ip", "localhost"), ("--rdzv_backend", "c10d"),
                          ("--main_process_port", str(15000 + int(job_id) % 15000))]:
        assert launch[launch.index(option) + 1] == value, option
    assert "--output=logs/%x-%j-node%n-%N.out" in launch
    for node in (0, 1):
        launched = json.loads((cluster.state / f"launch-{node}.json").read_text())
        assert launched[launched.index("--machine_rank") + 1] == str(node)
        assert launched[launched.index("--rdzv_conf") + 1] == f"is_host={int(node == 0)}"
        node_log = cluster.log(f"classify-{job_id}-node{node}-localhost.out")
        assert f"node {node} of 2" in node_log and "env-rocm.sh" in node_log
    # The per-job MIOpen folders were made on the nodes and removed at the end.
    assert cluster.node_local.is_dir() and not any(cluster.node_local.iterdir())


def test_single_node_launch_line_with_two_ranks_and_site_srun_options(tmp_path):
    cluster, args = _fake_job(tmp_path, "single-node.sbatch", GPUS_PER_NODE="2",
                              SRUN_ARGS="--cpu-bind=none --label")
    result = cluster.run(args, _free_job_id())
    assert result.returncode == 0, result.stdout + cluster.logs()
    launch = cluster.calls("srun")[0]
    assert "--multi_gpu" in launch and "--cpu-bind=none" in launch and "--label" in launch
    assert launch[launch.index("--num_processes") + 1] == "2"
    assert launch[launch.index("--rdzv_backend") + 1] == "static"


def _single_node_job(cluster: Cluster, reference: dict, out: Path) -> str:
    """single-node.sbatch on the reference config; its predictions must be the reference's."""
    job_id = _free_job_id()
    result = cluster.run([str(SLURM / "single-node.sbatch"), str(reference["config"]), *JOB_ARGS,
                          "--output.dir", str(out)], job_id)
    assert result.returncode == 0, result.stdout + cluster.logs()
    assert _predictions(read_rows(out)) == reference["rows"]
    return job_id


# --- the node's CPUs reach the ranks --------------------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({"CPUS_PER_NODE": "48", "SLURM_JOB_CPUS_PER_NODE": "128(x2)"}, "48"),
    ({"SLURM_JOB_CPUS_PER_NODE": "128(x2),64", "SLURM_CPUS_ON_NODE": "128"}, "64"),
    ({"SLURM_CPUS_ON_NODE": "96"}, "96"),
    ({}, ""),
])
def test_cpus_per_node_from_the_setting_else_the_smallest_nodes_allocation(env, expected):
    result = _bash("source slurm/common.sh; cpus_per_node", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_a_bad_cpu_count_stops_the_job_with_a_reason():
    result = _bash("source slurm/common.sh; cpus_per_node", CPUS_PER_NODE="many")
    assert result.returncode != 0 and "positive integer" in result.stderr


def test_the_launch_step_gets_the_nodes_cpus_where_slurm_binds_tasks(tmp_path):
    # A cluster whose srun binds each task to --cpus-per-task CPUs (default 1): without the
    # script's explicit count, every rank and worker of the node would share one core.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs to tell the node's CPUs from one")
    cluster, args = _fake_job(tmp_path, SLURM_STUB_CPU_BIND="1")
    result = cluster.run(args, _free_job_id())
    assert result.returncode == 0, result.stdout + cluster.logs()
    launch = cluster.calls("srun")[0]
    allocated = len(os.sched_getaffinity(0)) // 2  # the stub's 2 nodes share this host
    assert f"--cpus-per-task={allocated}" in launch
    for node in (0, 1):
        cpus = json.loads((cluster.state / f"cpus-{node}.json").read_text())
        assert len(cpus["affinity"]) == allocated == int(cpus["cpus_on_node"]), cpus
    assert f"with {allocated} CPU(s)" in cluster.logs()


def test_a_rank_bound_to_fewer_cpus_than_allocated_sizes_for_them_and_warns(reference, tmp_path):
    # The site binds the step to 1 CPU whatever srun asked; Slurm says the node has 2 (or more).
    allocated = len(os.sched_getaffinity(0))
    if allocated < 2:
        pytest.skip("needs at least 2 CPUs to restrict the affinity mask below the allocation")
    cluster = Cluster(tmp_path, SLURM_STUB_TASK_CPUS="1")
    out = tmp_path / "out"
    job_id = _single_node_job(cluster, reference, out)
    node_log = cluster.log(f"classify-{job_id}-node0-localhost.out")
    assert f"CPUs: 1 in the affinity mask, {allocated} allocated" in node_log
    assert (f"may run on 1 CPU(s) (its affinity mask) but Slurm allocated {allocated}"
            in node_log), node_log
    assert "1 thread(s)" in node_log, node_log


def test_a_job_whose_output_filesystem_fills_up_while_stopping_is_not_requeued(tmp_path):
    # Preempted (USR1), the ranks' last commits find the disk full: they exit 74, the launchers 1
    # (as torchrun reports any failed rank). The batch script must not requeue: a requeued run
    # would stop the same way; it ends with 74 and says what to do.
    cluster, args = _fake_job(tmp_path, FAKE_LAUNCH="full")
    job_id = _free_job_id()
    with cluster.submitted(args, job_id) as sbatch:
        deadline = time.monotonic() + 30
        while not all((cluster.state / f"launch-{node}.json").exists() for node in (0, 1)):
            assert sbatch.poll() is None, cluster.logs()
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.05)
        _stub("scancel", "--batch", "--signal=USR1", job_id, env=cluster.env)
        try:
            assert sbatch.wait(timeout=30) == 74, cluster.logs()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not stop after SIGUSR1\n{cluster.logs()}")
    assert cluster.record("requeue.log") == []
    main_log = cluster.log(f"classify-{job_id}.out")
    assert "the output filesystem is full or failing" in main_log and "not requeueing" in main_log
    assert "output filesystem fault" in cluster.log(f"classify-{job_id}-node0-localhost.out")
