"""Large photos for ``batch-classify bench``: the input pipeline with and without reduction.

The bench's own images are upscaled to camera sizes (4032x3024 is a 12 MP phone photo)
and saved as JPEGs in a temporary folder; the workers' decode, resize and crop then runs
over them twice, with ``runtime.reduced_decode`` auto and off. Two figures per setting:
the CPU time of one image's decode and preprocessing on one thread (the cost a node's cores
pay per image), and the rate of the job's own loader (threads or worker processes) into
device batches, without the model.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from batch_classify.pipeline.decode import ItemKey, Task, TaskDataset, open_image
from batch_classify.pipeline.distributed import Resources
from batch_classify.pipeline.loader import make_loader
from batch_classify.pipeline.preprocess import FastTransform, MultiTransform, PixelSpec

DEFAULT_SIZES = "4032x3024"

log = logging.getLogger("batch_classify.bench.large_photos")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'4032x3024,8000x6000' -> [(4032, 3024), (8000, 6000)] (landscape width x height)."""
    sizes = []
    for part in text.split(","):
        width, _, height = part.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
            raise ValueError(f"'{part}' is not WIDTHxHEIGHT")
        sizes.append((int(width), int(height)))
    return sizes


def upscaled_photos(sources: list, folder: Path, size: tuple[int, int], quality: int = 90) -> list[str]:
    """Each source image (a path or a stream) upscaled (bicubic) to ``size`` (a portrait to its
    transpose) and saved as a JPEG of that quality: a camera photo's size and file weight."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, source in enumerate(sources):
        image = open_image(source, 2**62)
        width, height = size if image.width >= image.height else size[::-1]
        path = folder / f"photo{index:05d}.jpg"
        image.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=quality)
        paths.append(str(path))
    return paths


def cpu_ms_per_image(transform: FastTransform, paths: list[str], max_pixels: int) -> float:
    """Decode + resize + crop of each file on this thread: CPU milliseconds per image."""
    dataset = TaskDataset(transform, max_pixels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's setting (decode.worker_init)
    try:
        dataset[Task(ItemKey(0, "warm-up", None), paths[0])]
        start = time.thread_time()
        for path in paths:
            sample = dataset[Task(ItemKey(0, path, None), path)]
            if sample.error is not None:
                raise RuntimeError(f"bench: {path}: {sample.error}")
        return (time.thread_time() - start) * 1000 / len(paths)
    finally:
        torch.set_num_threads(threads)


def loader_rate(transform: FastTransform, paths: list[str], max_pixels: int, batch_size: int,
                resources: Resources) -> float:
    """Images per second through the job's loader into uint8 batches, no model, worker start-up
    included. Each worker process gets a batch (a worker decodes its batch alone, so 16 photos
    in one batch would time one worker); decode threads share each batch."""
    tasks = [Task(ItemKey(0, path, None), path) for path in paths]
    batch_size = max(1, min(batch_size, math.ceil(len(tasks) / max(1, resources.workers))))
    batches = [tasks[start:start + batch_size] for start in range(0, len(tasks), batch_size)]
    loader = make_loader(TaskDataset(transform, max_pixels), batches, resources)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch.items)
    return count / (time.perf_counter() - start)


def over_sizes(sources: list, sizes: list[tuple[int, int]],
               measure_paths: Callable[[list[str]], dict]) -> dict:
    """``measure_paths`` on the sources upscaled to each size in turn (a temporary folder each)."""
    report = {}
    with tempfile.TemporaryDirectory(prefix="bench-large-photos-") as folder:
        for width, height in sizes:
            paths = upscaled_photos(sources, Path(folder) / f"{width}x{height}", (width, height))
            log.info("bench: %d photos of %dx%d (JPEG q90) made from the bench's images", len(paths),
                     width, height)
            report[f"{width}x{height}"] = {"images": len(paths), "megapixels": round(width * height / 1e6, 1),
                                           **measure_paths(paths)}
            shutil.rmtree(Path(folder) / f"{width}x{height}")
    return report


def compare_settings(transform_for: Callable[[str], Any], paths: list[str], max_pixels: int,
                     batch_size: int, resources: Resources) -> dict:
    """Both settings of runtime.reduced_decode on the same files: ``transform_for(setting)``."""
    result: dict = {}
    for setting in ("off", "auto"):
        transform = transform_for(setting)
        result[setting] = {
            "cpu_ms_per_image": round(cpu_ms_per_image(transform, paths, max_pixels), 2),
            "pipeline_images_per_s": round(loader_rate(transform, paths, max_pixels, batch_size,
                                                       resources), 2),
        }
    off, auto = result["off"]["cpu_ms_per_image"], result["auto"]["cpu_ms_per_image"]
    result["cpu_off/auto"] = round(off / auto, 2) if auto else None
    return result


def measure(spec: PixelSpec, paths: list[str], max_pixels: int, batch_size: int,
            resources: Resources) -> dict:
    """One model's transform, reduced_decode off and auto."""
    return compare_settings(lambda setting: FastTransform(spec, reduce=setting == "auto"), paths,
                            max_pixels, batch_size, resources)


def measure_pass(specs: list[PixelSpec], paths: list[str], max_pixels: int, batch_size: int,
                 resources: Resources) -> dict:
    """Several models' transforms on one decode (a pass): with off every pixel is decoded (as a
    pass of models with different resize targets did at auto too, before it shared a reduced
    decode); with auto one reduced decode covers twice the largest target."""
    def transform_for(setting: str) -> MultiTransform:
        return MultiTransform([FastTransform(spec, reduce=setting == "auto") for spec in specs])

    result = compare_settings(transform_for, paths, max_pixels, batch_size, resources)
    result["auto_decode"] = transform_for("auto").note
    return result
