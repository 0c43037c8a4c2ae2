"""Scale benchmark: memory and file counts against the collection's size (not a timed test).

``python -m batch_classify.bench.scale --images 100000 1000000 --dir /tmp/scale`` writes a
synthetic WebDataset of tiny JPEGs (10,000 per tar, the img2dataset layout), runs the job
over it on N CPU ranks with a tiny classifier, then ``aggregate`` in a fresh process, and
prints per size: listing time, peak RSS of each rank, files written, aggregate's peak RSS
and wall time, the job's images/s, and a rerun's wall time with everything committed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]
VARIANTS = 997
"""Distinct tiny JPEGs, reused round robin: encoding a million is not what is measured."""


def write_collection(folder: Path, n_images: int, per_tar: int = 10_000) -> list[Path]:
    """``{folder}/{i:05d}.tar``: ``per_tar`` samples of ``<key>.jpg`` + ``<key>.cls`` each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(VARIANTS):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    tars = []
    for shard, start in enumerate(range(0, n_images, per_tar)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(start, min(start + per_tar, n_images)):
                for suffix, data in (("jpg", jpegs[index % VARIANTS]), ("cls", str(index % 1000).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def tiny_model(folder: Path) -> Path:
    """A tiny MobileNetV1 with ImageNet's 1001 outputs, at 32x32: the job, not the model, is measured."""
    import torch
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    from batch_classify.bench.checkpoints import _imagenet_id2label

    torch.manual_seed(0)
    config = MobileNetV1Config(image_size=32, depth_multiplier=0.25, id2label=_imagenet_id2label(True))
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def _job(model: Path, data: Path, out: Path, ranks: int, batch_size: int) -> tuple[float, str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), "--num_processes", str(ranks),
               str(ROOT / "jobs" / "classify.py"), "--runtime.device", "cpu", "--model.name", str(model),
               "--data.path", str(data), "--output.dir", str(out), "--runtime.batch_size", str(batch_size)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"job failed:\n{result.stderr[-4000:]}")
    return time.monotonic() - started, result.stderr


def _aggregate(out: Path) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of ``batch-classify aggregate`` in a process of its own."""
    code = ("import resource, sys, time; from batch_classify.results.aggregate import aggregate; "
            "t = time.monotonic(); aggregate(sys.argv[1]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.monotonic() - t)")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                            check=True)
    peak, seconds = result.stdout.split()[-2:]
    return float(peak), float(seconds)


def measure(n_images: int, base: Path, ranks: int, batch_size: int, model: Path) -> dict:
    data = base / f"wds-{n_images}"
    if not data.exists():
        write_collection(data, n_images)
    out = base / f"out-{n_images}"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    seconds, log = _job(model, data, out, ranks, batch_size)
    listed = re.search(r"listed .* in ([\d.]+) s", log)
    timing = json.loads((out / "timing.json").read_text())
    files = sum(len(files) for _, _, files in os.walk(out))
    aggregate_rss, aggregate_s = _aggregate(out)
    rerun_s, _ = _job(model, data, out, ranks, batch_size)
    return {"images": n_images, "ranks": ranks, "job_wall_s": round(seconds, 1),
            "listing_s": float(listed.group(1)) if listed else None,
            "peak_rss_mb_per_rank": timing["peak_rss_mb_per_rank"],
            "images_per_s": round(timing["images_per_second"], 1),
            "files_in_output": files, "prediction_files": len(list((out / "predictions").iterdir())),
            "aggregate_peak_rss_mb": round(aggregate_rss, 1), "aggregate_s": round(aggregate_s, 1),
            "rerun_all_committed_s": round(rerun_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_classify.bench.scale", description=__doc__)
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path("outputs/scale-bench"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / "tiny-mobilenet"
    if not model.exists():
        tiny_model(model)
    results = []
    for n in args.images:
        results.append(measure(n, args.dir, args.ranks, args.batch_size, model))
        print(json.dumps(results[-1]), flush=True)
    (args.dir / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
