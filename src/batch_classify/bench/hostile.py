"""Hostile-input benchmark: what one bad item costs the job (not a timed test).

``python -m batch_classify.bench.hostile --dir /tmp/hostile`` builds one small collection per
attack beside a few good photos, runs the real job (2 CPU ranks, a tiny MobileNetV1 behind
ImageNet's 256-resize and 224-crop processor) over each
with the default limits, and prints per input: the rows and their error types, the peak RSS
of each rank (timing.json), the largest process's peak RSS (from the kernel, so also for a run
that failed or hung), the wall time and how the job ended.

The inputs (built once, kept in ``--dir``):
- ``baseline``: the good photos alone, for comparison;
- ``sparse-tar``: a 10 KB tar whose GNU sparse member claims 20 GB;
- ``gzip-bomb``: a .tar.gz whose member is 6 GB of zeros (about 6 MB compressed, written
  by streaming);
- ``strip``: a 1x20000 PNG;
- ``sixteen-bit``: an 11000x11000 16-bit grey PNG (121 M pixels, under the pixel limit);
- ``fifo``: a named pipe among the photos.

``--code DIR`` runs the job of another checkout (its ``jobs/classify.py`` and ``src``), for
before/after figures. Every job runs under ``--memory-gb`` of address space per process and
``--timeout`` seconds, so an unbounded read fails or is stopped instead of taking the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]
GOOD = 6
INPUTS = ("baseline", "sparse-tar", "gzip-bomb", "strip", "sixteen-bit", "fifo")


def _good_photos(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        y, x = np.mgrid[0:60, 0:80] / 80
        a, b, c = rng.normal(size=3)
        grey = (np.sin(a * 6 * x + b * 6 * y + c) * 0.5 + 0.5) * 255
        Image.fromarray(np.stack([grey, grey[::-1], 255 - grey], -1).astype(np.uint8)).save(
            folder / f"good{i}.jpg", quality=90)


def _good_members() -> list[tuple[str, bytes]]:
    members = []
    rng = np.random.default_rng(1)
    for i in range(GOOD):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        members += [(f"good{i}.jpg", buffer.getvalue()), (f"good{i}.cls", str(i).encode())]
    return members


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


class ZeroStream(io.RawIOBase):
    """``size`` zero bytes, a MiB at a time (the bomb is never held)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left, 1 << 20)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def sparse_header(name: str, claimed: int) -> bytes:
    """A GNU sparse member header claiming ``claimed`` bytes that stores no data."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = tarfile.GNUTYPE_SPARSE, 0, 1_700_000_000
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def build(base: Path) -> dict[str, Path]:
    """Each input's data.path (built where missing)."""
    paths = {}
    for name in INPUTS:
        folder = base / "inputs" / name
        marker = folder / ".built"
        paths[name] = folder
        if marker.exists():
            continue
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if name in {"sparse-tar", "gzip-bomb"}:
            if name == "sparse-tar":
                with tarfile.open(folder / "good.tar", "w") as tar:
                    for member, data in _good_members():
                        _add(tar, member, data)
                (folder / "sparse.tar").write_bytes(sparse_header("huge.jpg", 20 * 10**9)
                                                    + bytes(1024))
            else:
                with gzip.open(folder / "bomb.tar.gz", "wb", compresslevel=6) as out, \
                        tarfile.open(fileobj=out, mode="w|") as tar:
                    for member, data in _good_members():
                        _add(tar, member, data)
                    info = tarfile.TarInfo("bomb.jpg")
                    info.size = 6 * 10**9
                    tar.addfile(info, ZeroStream(info.size))
                    _add(tar, "bomb.cls", b"1")
        else:
            _good_photos(folder)
            if name == "strip":
                Image.new("RGB", (1, 20000), (90, 120, 60)).save(folder / "strip.png")
            elif name == "sixteen-bit":
                y, x = np.mgrid[0:11000, 0:11000:1000]  # a smooth ramp compresses well
                ramp = np.repeat(((x + y) * 2).astype("<u2"), 1000, axis=1)[:, :11000]
                Image.frombytes("I;16", (11000, 11000), ramp.tobytes()).save(folder / "sixteen.png")
                del ramp
        marker.touch()
    fifo = paths["fifo"] / "pipe.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    return paths


def tiny_model(folder: Path) -> Path:
    """A tiny MobileNetV1 (random weights, ImageNet's 1001 outputs) with ImageNet's usual
    input: the shorter side resized to 256, a 224 centre crop. The network is cheap; the
    resize is what a real checkpoint would do to each image."""
    import torch
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    from batch_classify.bench.checkpoints import _imagenet_id2label

    torch.manual_seed(0)
    config = MobileNetV1Config(image_size=224, depth_multiplier=0.25, id2label=_imagenet_id2label(True))
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


_RAISED = re.compile(r"^(\[rank\d+\]: )?(batch-classify: |(?!ChildFailedError)\w+(Error|Exception): )")
"""The line that says why a rank stopped: the job's one-line error or an exception's last line."""

_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")


@dataclass
class Setup:
    """Where the bench writes, the model and code it runs, and each job's ranks and limits."""

    base: Path
    model: Path
    code: Path
    ranks: int
    timeout: float
    memory_gb: float


def run(name: str, data: Path, setup: Setup) -> dict:
    base, model, code, ranks, timeout = setup.base, setup.model, setup.code, setup.ranks, setup.timeout
    memory_gb = setup.memory_gb
    out = base / "outputs" / (code.name or "code") / name
    if out.exists():
        shutil.rmtree(out)
    kind = "webdataset" if name in {"sparse-tar", "gzip-bomb"} else "images"
    job = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), "--num_processes", str(ranks),
           str(code / "jobs" / "classify.py"), "--runtime.device", "cpu", "--model.name", str(model),
           "--data.path", str(data), "--data.kind", kind, "--output.dir", str(out),
           "--runtime.batch_size", "4"]
    env = {**os.environ, "PYTHONPATH": str(code / "src")}
    limit = int(memory_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", _WRAPPER, *job], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, preexec_fn=cap,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        ended = "ok"
    except subprocess.TimeoutExpired:
        # The launcher starts each rank in a session of its own: every descendant is stopped.
        for pid in [process.pid, *_descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        ended = f"hung: killed after {timeout:.0f} s"
    seconds = time.monotonic() - started
    (out.parent / f"{name}.stderr.log").write_text(stderr)
    largest = None
    for line in stdout.splitlines():
        if line.startswith("maxrss "):
            _, kb, status = line.split()
            largest = round(int(kb) / 1024)
            if int(status) != 0:
                reason = next((x for x in stderr.splitlines() if _RAISED.match(x)), f"exit {status}")
                ended = f"failed: {reason.strip()[:120]}"
    result = {"input": name, "ended": ended, "wall_s": round(seconds, 1), "largest_process_rss_mb": largest,
              "rows": None, "errors": None, "peak_rss_mb_per_rank": None}
    timing = out / "timing.json"
    if timing.exists():
        per_rank = json.loads(timing.read_text())["peak_rss_mb_per_rank"]
        result["peak_rss_mb_per_rank"] = [round(v) for v in per_rank]
    predictions = sorted((out / "predictions").glob("*.parquet")) if (out / "predictions").exists() else []
    if predictions:
        import pyarrow.parquet as pq

        errors = [e for p in predictions for e in pq.read_table(p, columns=["error"]).column(0).to_pylist()]
        result["rows"] = len(errors)
        result["errors"] = dict(Counter(e.split(":", 1)[0] for e in errors if e))
    return result


def table(results: list[dict]) -> str:
    lines = ["| input | rows | error rows | peak RSS per rank (MiB) | largest process (MiB) | wall (s) "
             "| ended |", "|---|---|---|---|---|---|---|"]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in sorted((r["errors"] or {}).items())) or "-"
        ranks = " / ".join(map(str, r["peak_rss_mb_per_rank"])) if r["peak_rss_mb_per_rank"] else "-"
        lines.append(f"| {r['input']} | {r['rows'] if r['rows'] is not None else '-'} | {errors} | {ranks} | "
                     f"{r['largest_process_rss_mb'] or '-'} | {r['wall_s']} | {r['ended']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_classify.bench.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("outputs/hostile-bench"))
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose job runs (default: this one)")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--memory-gb", type=float, default=8, help="address space per process")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    paths = build(args.dir)
    model = args.dir / "tiny-mobilenet-224"
    if not model.exists():
        tiny_model(model)
    results = []
    for name in args.inputs:
        setup = Setup(args.dir, model, args.code.resolve(), args.ranks, args.timeout, args.memory_gb)
        results.append(run(name, paths[name], setup))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    (args.dir / f"hostile-{args.code.resolve().name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
