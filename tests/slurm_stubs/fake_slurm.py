#!/usr/bin/env python3
"""Stand-ins for sbatch, srun, scontrol and scancel: a Slurm allocation of N "nodes", all this host.

The commands are the symlinks beside this file (the name it is called by picks the command);
put this folder first on PATH. Standard library only. State shared between the commands (running
steps and batch shells, and what was requeued or signalled) lives in $SLURM_STUB_STATE.

Where real Slurm does something a batch script must respect, the stubs do it too:

- sbatch runs a copy of the script from a spool folder (so $0 is not in the project), in the
  submit folder, with the #SBATCH options (the command line's win), the job's environment
  (SLURM_JOB_ID, SLURM_JOB_NODELIST, ..., and SLURM_NODEID=0: the batch shell is on node 0) and
  stdout/stderr in the --output file. Unlike real sbatch it runs the job at once and waits for it
  (like `sbatch --wait`); array tasks run one after another. SLURM_STUB_JOB_ID sets the job id:
  a job run again under its id after `scontrol requeue` gets SLURM_RESTART_COUNT, as a requeued
  job does.
- srun starts one task per node (--ntasks-per-node) with that node's SLURM_NODEID, SLURM_PROCID,
  SLURM_LOCALID, ..., each task in its own process group (a node's step cgroup). Signals it gets
  are forwarded to every process of every task, except SIGTERM, SIGHUP and SIGQUIT, which real
  srun turns into SIGKILL ("forcing job termination"). --kill-on-bad-exit ends the other tasks
  when one fails; when a task ends, what is left of it is killed, as slurmstepd does. The exit
  status is the worst of the tasks' (128 + signal for a killed one).
- scancel --signal=SIG JOB signals every process of the job's steps but not the batch shell;
  with --batch only the batch shell (that is how `#SBATCH --signal=B:USR1@...` arrives).
- scontrol show hostnames expands a hostlist (node[01-04],gpu7); scontrol requeue records it.

Not emulated, and tested under a real Slurm instead (tests/run/test_slurm_cluster.py): Slurm's own
SIGTERM to every process of a job it cancels, requeues or loses a node of, the Restarts count,
the delay before a requeued job runs again, and what launchers exit with when stopped.

Every call is logged to $SLURM_STUB_STATE/calls.jsonl; requeue.log and signals.log hold the
requeues and signals. Nodes default to "localhost" (SLURM_STUB_NODELIST overrides): every node
must resolve to this host. SLURM_STUB_START_ORDER=reverse makes srun start the last node first,
SLURM_STUB_STAGGER_S waits between task starts.

CPU binding, as a cluster with TaskPlugin=task/affinity does it: with SLURM_STUB_CPU_BIND=1 each
srun task runs on the first --cpus-per-task CPUs (default 1, as srun's since Slurm 22.05, which
no longer inherits the batch script's) of the allocation's affinity mask; SLURM_STUB_TASK_CPUS=N
binds every task to N CPUs whatever srun was asked (a site whose step gets fewer CPUs than the
node's allocation). sbatch sets SLURM_JOB_CPUS_PER_NODE ("2(x2)") and SLURM_CPUS_ON_NODE.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Options each command accepts: name -> takes a value. Short options map to long names.
SBATCH_OPTIONS = {
    "nodes": True, "job-name": True, "output": True, "error": True, "open-mode": True,
    "array": True, "signal": True, "requeue": False, "no-requeue": False, "time": True,
    "partition": True, "account": True, "qos": True, "constraint": True, "gpus-per-node": True,
    "gpus": True, "gres": True, "ntasks": True, "ntasks-per-node": True, "cpus-per-task": True,
    "cpus-per-gpu": True, "mem": True, "mem-per-gpu": True, "exclusive": False, "chdir": True,
    "wait": False, "parsable": False, "export": True, "mail-type": True, "mail-user": True,
}
SBATCH_SHORT = {"N": "nodes", "J": "job-name", "o": "output", "e": "error", "a": "array",
                "t": "time", "p": "partition", "A": "account", "q": "qos", "C": "constraint",
                "G": "gpus", "n": "ntasks", "c": "cpus-per-task", "D": "chdir", "W": "wait"}
SRUN_OPTIONS = {
    "nodes": True, "ntasks": True, "ntasks-per-node": True, "cpus-per-task": True,
    "kill-on-bad-exit": None, "output": True, "error": True, "open-mode": True, "label": False,
    "export": True, "gpus-per-node": True, "gres": True, "job-name": True, "overlap": False,
    "exact": False, "cpu-bind": True, "mpi": True, "unbuffered": False, "quiet": False,
    "chdir": True,
}
SRUN_SHORT = {"N": "nodes", "n": "ntasks", "c": "cpus-per-task", "K": "kill-on-bad-exit",
              "o": "output", "e": "error", "l": "label", "J": "job-name", "u": "unbuffered",
              "Q": "quiet", "D": "chdir"}
# Real srun answers these by killing the step's tasks; it forwards the others.
SRUN_KILLING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SRUN_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT,
                          signal.SIGALRM)


class UsageError(Exception):
    """A call the real command would refuse (or the stub does not support)."""


def parse_options(args: list[str], known: dict[str, bool | None], short: dict[str, str],
                  command: str) -> tuple[dict[str, str | bool], list[str]]:
    """GNU-style options up to the first operand; returns (options, operands and the rest)."""
    options: dict[str, str | bool] = {}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
        else:
            if arg[1] not in short:
                raise UsageError(f"{command}: invalid option -- '{arg[1]}'")
            name, value = short[arg[1]], arg[2:]
            has_value = bool(value)
        if name not in known:
            raise UsageError(f"{command}: unrecognized option '--{name}'")
        takes_value = known[name]
        if takes_value and not has_value:
            i += 1
            if i >= len(args):
                raise UsageError(f"{command}: option '--{name}' requires an argument")
            value = args[i]
        elif takes_value is False and has_value:
            raise UsageError(f"{command}: option '--{name}' takes no argument")
        options[name] = value if (takes_value or has_value) else True
        i += 1
    return options, args[i:]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax: 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [host for part in parts if part for host in _expand_one(part)]


def _expand_one(expression: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", expression)
    if not match:
        return [expression]
    prefix, tails = expression[:match.start()], _expand_one(expression[match.end():])
    hosts = []
    for item in match.group(1).split(","):
        low, _, high = item.partition("-")
        numbers = ([str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
                   if high else [low])
        hosts.extend(prefix + number + tail for number in numbers for tail in tails)
    return hosts


def expand_filename(pattern: str, values: dict[str, str]) -> str:
    """srun/sbatch filename patterns: %j %J %s %N %n %t %x %u %A %a, %% for a percent sign."""
    return re.sub(r"%(.)", lambda m: "%" if m.group(1) == "%" else values.get(m.group(1), m.group(0)),
                  pattern)


def state_dir() -> Path:
    path = Path(os.environ.get("SLURM_STUB_STATE")
                or Path(os.environ.get("TMPDIR", "/tmp")) / f"slurm-stub-{os.getuid()}")
    for sub in ("steps", "batch", "spool"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def record(name: str, line: str) -> None:
    with open(state_dir() / name, "a") as file:
        file.write(line.rstrip("\n") + "\n")


def log_call(command: str, argv: list[str]) -> None:
    record("calls.jsonl", json.dumps({"command": command, "argv": argv,
                                      "job": os.environ.get("SLURM_JOB_ID"), "time": time.time()}))


def signal_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    name = name.upper()
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


def signal_groups(pgids: list[int], signum: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def step_records(job_id: str) -> Iterator[tuple[str, list[int]]]:
    """(step id, task process groups) of the job's running steps."""
    for path in sorted((state_dir() / "steps").glob(f"{job_id}.*")):
        with contextlib.suppress(FileNotFoundError, ValueError):
            yield path.name, [int(pgid) for pgid in path.read_text().split()]


# --- scontrol ------------------------------------------------------------------------------------

def scontrol(args: list[str]) -> int:
    if args[:2] in (["show", "hostnames"], ["show", "hostname"]):
        nodelist = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UsageError("scontrol: no hostlist given and SLURM_JOB_NODELIST is not set")
        print("\n".join(expand_hostlist(nodelist)))
        return 0
    if args[:1] == ["requeue"]:
        job_ids = [job for arg in args[1:] if not arg.startswith("-") for job in arg.split(",")]
        if not job_ids:
            raise UsageError("scontrol: requeue needs a job id")
        for job_id in job_ids:
            record("requeue.log", job_id)
        return 0
    raise UsageError(f"scontrol stub: supports 'show hostnames' and 'requeue', not {args!r}")


# --- scancel -------------------------------------------------------------------------------------

def scancel(args: list[str]) -> int:
    options, jobs = parse_options(args, {"signal": True, "batch": False, "full": False},
                                  {"s": "signal", "b": "batch", "f": "full"}, "scancel")
    if not jobs:
        raise UsageError("scancel: no job id given")
    signum = signal_number(str(options.get("signal", "TERM")))
    name = signal.Signals(signum).name
    for job in jobs:
        job_id, _, step = job.partition(".")
        if options.get("batch") or options.get("full"):
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int((state_dir() / "batch" / job_id).read_text()), signum)
                record("signals.log", f"scancel {name} {job_id}.batch")
            if not options.get("full"):
                continue
        for step_name, pgids in step_records(job_id):
            if not step or step_name == f"{job_id}.{step}":
                signal_groups(pgids, signum)
                record("signals.log", f"scancel {name} {step_name} ({len(pgids)} task(s))")
    return 0


# --- srun ----------------------------------------------------------------------------------------

class Step:
    """The running tasks of one srun, and how signals reach them."""

    def __init__(self, job_id: str, step_id: int):
        self.name = f"{job_id}.{step_id}"
        self.tasks: list[tuple[int, str, subprocess.Popen]] = []  # (task id, host, process)
        self.record = state_dir() / "steps" / self.name

    def save(self) -> None:
        self.record.write_text(" ".join(str(p.pid) for _, _, p in self.tasks))

    def signal(self, signum: int) -> None:
        signal_groups([p.pid for _, _, p in self.tasks], signum)

    def on_signal(self, signum: int, _frame) -> None:
        if signum in SRUN_KILLING_SIGNALS:
            print(f"srun: forcing job termination (got {signal.Signals(signum).name})",
                  file=sys.stderr, flush=True)
            record("signals.log", f"srun {signal.Signals(signum).name} -> SIGKILL {self.name}")
            self.signal(signal.SIGKILL)
        else:
            record("signals.log", f"srun forwards {signal.Signals(signum).name} {self.name}")
            self.signal(signum)


def next_step_id(job_id: str) -> int:
    counter = state_dir() / "steps" / f"next-{job_id}"
    step_id = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(step_id + 1))
    return step_id


def srun(args: list[str]) -> int:
    options, command = parse_options(args, SRUN_OPTIONS, SRUN_SHORT, "srun")
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise UsageError("srun stub: runs only inside an allocation (sbatch sets SLURM_JOB_ID)")
    if not command:
        raise UsageError("srun: fatal: No command given to execute.")
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(str(options.get("nodes", len(hosts))).split("-")[0])
    if nodes > len(hosts):
        raise UsageError(f"srun: error: only {len(hosts)} nodes in the allocation, asked {nodes}")
    per_node = int(options.get("ntasks-per-node", 0)) or max(
        1, -(-int(options.get("ntasks", nodes)) // nodes))
    ntasks = int(options.get("ntasks", nodes * per_node))
    hosts = hosts[:nodes]
    step = Step(job_id, next_step_id(job_id))
    step_id = step.name.split(".")[1]
    cpus_per_node = max(1, len(os.sched_getaffinity(0)) // nodes)
    bound = _task_cpus(options)

    output, error = options.get("output"), options.get("error")
    mode = "a" if options.get("open-mode") == "append" else "w"
    files: dict[str, object] = {}

    def open_output(pattern, values):
        name = expand_filename(str(pattern), values)
        if name not in files:
            files[name] = open(name, mode)  # noqa: SIM115 - closed when the step ends
        return files[name]

    layout = [(node, local) for node in range(nodes) for local in range(per_node)][:ntasks]
    order = list(enumerate(layout))
    if os.environ.get("SLURM_STUB_START_ORDER") == "reverse":
        order.reverse()
    stagger = float(os.environ.get("SLURM_STUB_STAGGER_S", "0"))
    for signum in SRUN_KILLING_SIGNALS + SRUN_FORWARDED_SIGNALS:
        signal.signal(signum, step.on_signal)

    kill_on_bad_exit = str(options.get("kill-on-bad-exit", "0")) not in ("0", "False")
    worst = 0
    try:
        for position, (task_id, (node, local)) in enumerate(order):
            if position and stagger:
                time.sleep(stagger)
            host = hosts[node]
            env = {**os.environ,
                   "SLURM_STEP_ID": step_id, "SLURM_STEPID": step_id,
                   "SLURM_NODEID": str(node), "SLURM_PROCID": str(task_id),
                   "SLURM_LOCALID": str(local), "SLURM_NNODES": str(nodes),
                   "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_NTASKS": str(ntasks),
                   "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
                   "SLURM_STEP_NODELIST": ",".join(hosts), "SLURM_TASKS_PER_NODE": str(per_node),
                   "SLURMD_NODENAME": host, "SLURM_TOPOLOGY_ADDR": host,
                   "SLURM_CPUS_ON_NODE": str(cpus_per_node),
                   "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}
            values = {"j": job_id, "J": step.name, "s": step_id, "N": host, "n": str(node),
                      "t": str(task_id), "x": os.environ.get("SLURM_JOB_NAME", ""),
                      "u": getpass.getuser(), "A": os.environ.get("SLURM_ARRAY_JOB_ID", job_id),
                      "a": os.environ.get("SLURM_ARRAY_TASK_ID", "4294967294")}
            stdout = open_output(output, values) if output else None
            stderr = open_output(error, values) if error else (subprocess.STDOUT if stdout else None)
            if "cpus-per-task" in options:
                env["SLURM_CPUS_PER_TASK"] = str(options["cpus-per-task"])
            try:
                process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr,
                                           cwd=options.get("chdir"), start_new_session=True,
                                           preexec_fn=None if bound is None
                                           else lambda: os.sched_setaffinity(0, bound))
            except OSError as exc:
                print(f"srun: error: {host}: task {task_id}: {exc}", file=sys.stderr)
                worst = max(worst, 2)
                break
            step.tasks.append((task_id, host, process))
            step.save()

        running = list(step.tasks)
        while running:
            for task in list(running):
                task_id, host, process = task
                status = process.poll()
                if status is None:
                    continue
                running.remove(task)
                signal_groups([process.pid], signal.SIGKILL)  # what the task left behind
                code = 128 - status if status < 0 else status
                if code:
                    how = (f"Killed by signal {signal.Signals(-status).name}" if status < 0
                           else f"Exited with exit code {status}")
                    print(f"srun: error: {host}: task {task_id}: {how}", file=sys.stderr, flush=True)
                    if kill_on_bad_exit and running:
                        print(f"srun: error: Terminating StepId={step.name}", file=sys.stderr,
                              flush=True)
                        signal_groups([p.pid for _, _, p in running], signal.SIGTERM)
                        _kill_later(running)
                worst = max(worst, code)
            time.sleep(0.05)
    finally:
        step.signal(signal.SIGKILL)
        step.record.unlink(missing_ok=True)
        for file in files.values():
            file.close()
    return worst


def _task_cpus(options: dict) -> set[int] | None:
    """The CPUs each task is bound to (SLURM_STUB_CPU_BIND, SLURM_STUB_TASK_CPUS), or None."""
    forced = os.environ.get("SLURM_STUB_TASK_CPUS")
    if not forced and os.environ.get("SLURM_STUB_CPU_BIND") != "1":
        return None
    if str(options.get("cpu-bind", "")).startswith("none") and not forced:
        return None
    count = int(forced or options.get("cpus-per-task", 1))
    allowed = sorted(os.sched_getaffinity(0))
    if count > len(allowed):
        raise UsageError(f"srun: error: --cpus-per-task={count}: the node has {len(allowed)} CPUs")
    return set(allowed[:count])


def _kill_later(running: list, grace_s: float = 5.0) -> None:
    """Slurm's KillWait: SIGKILL what is still running a while after the SIGTERM."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for _, _, p in running):
        time.sleep(0.05)
    signal_groups([p.pid for _, _, p in running], signal.SIGKILL)


# --- sbatch --------------------------------------------------------------------------------------

def script_options(script: str) -> list[str]:
    """The #SBATCH lines before the first command, as one argument list."""
    args: list[str] = []
    for number, line in enumerate(Path(script).read_text().splitlines()):
        stripped = line.strip()
        if number == 0 and stripped.startswith("#!"):
            continue
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            args.extend(shlex.split(stripped[len("#SBATCH"):], comments=True))
    return args


def array_indices(spec: str) -> list[int]:
    """'0-9%2', '1,4,7', '0-15:4' -> the indices (the % throttle is moot: tasks run in turn)."""
    indices: list[int] = []
    for part in spec.split("%")[0].split(","):
        bounds, _, stride = part.partition(":")
        low, _, high = bounds.partition("-")
        indices.extend(range(int(low), int(high or low) + 1, int(stride or 1)))
    return indices


def sbatch(args: list[str]) -> int:
    cli_options, rest = parse_options(args, SBATCH_OPTIONS, SBATCH_SHORT, "sbatch")
    if not rest:
        raise UsageError("sbatch stub: give a script file (reading it from stdin is not supported)")
    script, script_args = rest[0], rest[1:]
    if not Path(script).read_text().startswith("#!"):
        raise UsageError("sbatch: error: This does not look like a batch script. The first line "
                         "must start with #! followed by the path to an interpreter.")
    options, _ = parse_options(script_options(script), SBATCH_OPTIONS, SBATCH_SHORT, "sbatch")
    options.update(cli_options)

    nodes = int(str(options.get("nodes", 1)).split("-")[0])
    nodelist = os.environ.get("SLURM_STUB_NODELIST") or ",".join(["localhost"] * nodes)
    hosts = expand_hostlist(nodelist)
    if len(hosts) < nodes:
        raise UsageError(f"sbatch stub: SLURM_STUB_NODELIST has {len(hosts)} of {nodes} nodes")
    job_id = int(os.environ.get("SLURM_STUB_JOB_ID") or random.randint(100000, 999999))
    name = str(options.get("job-name", Path(script).name))
    submit_dir = os.getcwd()
    workdir = str(options.get("chdir", submit_dir))
    indices = array_indices(str(options["array"])) if "array" in options else [None]
    print(f"Submitted batch job {job_id}", flush=True)

    worst = 0
    for position, index in enumerate(indices):
        this_id = str(job_id + position)
        env = {**os.environ,
               "SLURM_STUB_STATE": str(state_dir()),
               "SLURM_JOB_ID": this_id, "SLURM_JOBID": this_id, "SLURM_JOB_NAME": name,
               "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
               "SLURM_JOB_NODELIST": ",".join(hosts[:nodes]), "SLURM_NODELIST": ",".join(hosts[:nodes]),
               "SLURM_SUBMIT_DIR": submit_dir, "SLURM_SUBMIT_HOST": socket.gethostname(),
               "SLURM_CLUSTER_NAME": "stub", "SLURMD_NODENAME": hosts[0],
               "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_CPUS_ON_NODE": str(max(1, len(os.sched_getaffinity(0)) // nodes)),
               "SLURM_JOB_CPUS_PER_NODE": f"{max(1, len(os.sched_getaffinity(0)) // nodes)}(x{nodes})",
               "SLURM_JOB_PARTITION": str(options.get("partition", "stub"))}
        if "gpus-per-node" in options:
            env["SLURM_GPUS_PER_NODE"] = str(options["gpus-per-node"])
            env["SLURM_GPUS_ON_NODE"] = str(options["gpus-per-node"]).rpartition(":")[2]
        if "ntasks-per-node" in options:
            env["SLURM_NTASKS_PER_NODE"] = str(options["ntasks-per-node"])
        if index is not None:
            env.update({"SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_ARRAY_TASK_ID": str(index),
                        "SLURM_ARRAY_TASK_COUNT": str(len(indices)),
                        "SLURM_ARRAY_TASK_MIN": str(min(indices)),
                        "SLURM_ARRAY_TASK_MAX": str(max(indices))})
        requeue_log = state_dir() / "requeue.log"
        restarts = requeue_log.read_text().split().count(this_id) if requeue_log.exists() else 0
        if restarts:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        worst = max(worst, _run_batch(script, script_args, options, env, workdir, index))
    return worst


def _run_batch(script: str, script_args: list[str], options: dict, env: dict[str, str],
               workdir: str, index: int | None) -> int:
    job_id = env["SLURM_JOB_ID"]
    values = {"j": job_id, "x": env["SLURM_JOB_NAME"], "u": getpass.getuser(),
              "N": env["SLURMD_NODENAME"], "A": env.get("SLURM_ARRAY_JOB_ID", job_id),
              "a": str(index) if index is not None else "4294967294"}
    default_output = "slurm-%A_%a.out" if index is not None else "slurm-%j.out"
    mode = "a" if options.get("open-mode") == "append" else "w"
    paths = {stream: Path(workdir, expand_filename(str(options.get(stream, default_output)), values))
             for stream in ("output", "error")}
    for path in paths.values():
        if not path.parent.is_dir():
            # Real Slurm would start the job and fail it without a log: be louder.
            raise UsageError(f"sbatch stub: the log folder {path.parent} does not exist")
    spool = state_dir() / "spool" / job_id
    spool.mkdir(parents=True, exist_ok=True)
    copy = spool / "slurm_script"
    shutil.copyfile(script, copy)
    copy.chmod(0o755)
    record("calls.jsonl", json.dumps({"command": "sbatch-run", "job": job_id,
                                      "output": str(paths["output"]), "args": script_args}))
    with open(paths["output"], mode) as out:
        err = open(paths["error"], mode) if "error" in options else out  # noqa: SIM115
        try:
            shell = subprocess.Popen([str(copy), *script_args], env=env, cwd=workdir,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            batch_record = state_dir() / "batch" / job_id
            batch_record.write_text(str(shell.pid))
            try:
                status = shell.wait()
            finally:
                batch_record.unlink(missing_ok=True)
                # The job is over: slurmd ends whatever its steps left running.
                for _, pgids in step_records(job_id):
                    signal_groups(pgids, signal.SIGKILL)
        finally:
            if err is not out:
                err.close()
    return 128 - status if status < 0 else status


COMMANDS = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel}


def main() -> int:
    command = Path(sys.argv[0]).name
    if command not in COMMANDS:
        print(f"fake_slurm.py: call me as one of {sorted(COMMANDS)} (a symlink)", file=sys.stderr)
        return 2
    log_call(command, sys.argv[1:])
    try:
        return COMMANDS[command](sys.argv[1:])
    except UsageError as error:
        print(error, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`scontrol show hostnames | head -n1`): quiet, as SIGPIPE ends a C tool.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
