"""``batch-classify bench``: how close the job runs to the model alone, and to the peers.

One run, the same images, model, device, batch size and precision, five stages (with several
models in model.name instead: one pass of them all against one job per model, ``models_bench``):

1. model: forward passes on ready tensors (on the device, normalised, in the job's layout);
2. pipeline: decode + preprocess into device batches, no model;
3. job: the full job, end to end, writing Parquet (its own timing.json);
4. hf_pipeline: ``transformers.pipeline("image-classification", batch_size=...)``;
5. seed_loop: one image at a time, ``processor(image)`` then ``model(**inputs)``.

With ``large_photos`` (on by default) the main rank also measures the workers' decode and
preprocessing on camera-sized photos made from the bench's images, with
``runtime.reduced_decode`` auto and off (``large_photos.py``), before the other stages.

They run in the order pipeline, hf_pipeline, seed_loop, then the model-only rounds with the
job in their middle. Started plainly it is one rank; under ``accelerate launch``
every stage runs on every rank at once over that rank's share of the images (the job's own
layout), and a stage's rate is all its images over the time from the first rank's start to
the last rank's end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from batch_classify import __version__
from batch_classify.bench.large_photos import DEFAULT_SIZES, over_sizes, parse_sizes
from batch_classify.bench.large_photos import measure as measure_large_photos
from batch_classify.core.config import ConfigError, JobSpec, parse_args
from batch_classify.core.limits import Limits
from batch_classify.core.ownership import remove_output
from batch_classify.inputs.listing import Items, load_items
from batch_classify.models.model import load_model, prepare_inference
from batch_classify.models.predict import PRECISIONS, Predictor, Scoring, autocast
from batch_classify.pipeline.decode import ItemKey, Task, TaskDataset, open_image
from batch_classify.pipeline.distributed import Resources, configure_logging, init_state, keep_host_memory
from batch_classify.pipeline.loader import make_loader
from batch_classify.run.job import resolve_runtime

log = logging.getLogger("batch_classify.bench.stages")

STAGES = ("model", "pipeline", "hf_pipeline", "seed_loop", "job")  # as reported
SINGLE_MODEL_OPTIONS = ("--bench.stages", "--bench.limit", "--bench.baseline_limit", "--bench.rounds")
"""What the several-model bench (``models_bench``) has no use for: refused, not ignored."""
EXTRA_STAGES = ("large_photos",)  # reported apart: its own figures
RATIOS = {"job/model": ("job", "model"), "job/hf_pipeline": ("job", "hf_pipeline"),
          "job/seed_loop": ("job", "seed_loop"), "pipeline/model": ("pipeline", "model")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def versions() -> dict[str, str | None]:
    import accelerate
    import timm
    import torchvision
    import transformers

    return {"batch_classify": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_model(spec, loaded, inference, device, n_images: int, ready: list[torch.Tensor]) -> dict:
    """Forward passes over ready device tensors: real batches from the pipeline, cycled."""
    scoring = Scoring(spec.runtime.precision, spec.output.top_k,
                      pad_to=spec.runtime.batch_size if spec.runtime.compile else None)
    predictor = Predictor(inference.model, loaded.labels, device, lambda pixels: pixels, scoring)
    predictor.launch(ready[0]).result()  # warm-up (kernel selection, allocator, compilation)
    _sync(device)
    start = time.perf_counter()
    pending, done, turn = None, 0, 0
    while done < n_images:
        batch = ready[turn % len(ready)]
        batch = batch[:n_images - done]
        launched = predictor.launch(batch)
        if pending is not None:
            pending.result()
        pending = launched
        done += len(batch)
        turn += 1
    if pending is not None:
        pending.result()
    _sync(device)
    return {"images": n_images, "start": start, "end": time.perf_counter()}


KEEP_BATCHES = 8


def stage_pipeline(spec, items, indices, inference, resources: Resources) -> tuple[dict, list]:
    """Decode and preprocess into device batches, no model.

    Also returns up to KEEP_BATCHES of its full batches, ready on the device, for the model
    stage: real images, in the layout and dtype the job feeds the model.
    """
    dataset = TaskDataset(inference.input_path.worker, Limits.from_runtime(spec.runtime))
    loader = make_loader(dataset, task_batches(items, indices, spec.runtime.batch_size), resources)
    device = resources.device
    prepare = inference.prepare(device)
    kept: list[torch.Tensor] = []
    start, count = None, 0
    with torch.inference_mode():
        for batch in loader:
            if start is None:
                start = time.perf_counter()
            batch = inference.input_path.finish_decoding(batch)
            if batch.pixel_values is not None:
                ready = prepare(batch.pixel_values)
                if len(kept) < KEEP_BATCHES and (not kept or len(ready) >= len(kept[0])):
                    kept.append(ready)
            count += len(batch.items)
    _sync(device)
    return {"images": count, "start": start, "end": time.perf_counter()}, kept


def task_batches(items: Items, indices: list[int], batch_size: int) -> list[list[Task]]:
    """The items at ``indices`` as the job's decode tasks, in batches."""
    tasks = [Task(ItemKey(0, items.ids[i], items.labels[i]), items.payloads[i]) for i in indices]
    return [tasks[start:start + batch_size] for start in range(0, len(tasks), batch_size)]


def _paths(items: Items, indices: list[int], max_pixels: int) -> list[Any]:
    if items.paths is not None:
        return [items.paths[i] for i in indices]
    return [open_image(items.open(i), max_pixels) for i in indices]  # datasets: decoded up front


def stage_hf_pipeline(spec, items, indices, device) -> dict:
    """transformers' image-classification pipeline, batched, as a user would run it."""
    from transformers import pipeline

    dtype = PRECISIONS[spec.runtime.precision] or torch.float32
    classify = pipeline("image-classification", model=spec.model.name, device=device,
                        dtype=dtype, revision=spec.model.revision,
                        trust_remote_code=spec.model.trust_remote_code)
    inputs = _paths(items, indices, spec.runtime.max_image_pixels)
    classify(inputs[:2], batch_size=spec.runtime.batch_size, top_k=spec.output.top_k)  # warm-up
    start = time.perf_counter()
    results = classify(inputs, batch_size=spec.runtime.batch_size, top_k=spec.output.top_k)
    _sync(device)
    return {"images": len(results), "start": start, "end": time.perf_counter()}


def stage_seed_loop(spec, items, indices, device) -> dict:
    """One image at a time: processor(image), then model(**inputs), as the seed script did."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    kwargs = {"revision": spec.model.revision, "trust_remote_code": spec.model.trust_remote_code}
    processor = AutoImageProcessor.from_pretrained(spec.model.name, **kwargs)
    model = AutoModelForImageClassification.from_pretrained(spec.model.name, **kwargs).eval().to(device)
    from PIL import Image

    def classify(index: int) -> int:
        source = items.open(index)
        image = Image.open(source).convert("RGB")
        inputs = processor(images=image, return_tensors="pt").to(device)
        with torch.inference_mode(), autocast(device, spec.runtime.precision):
            return int(model(**inputs).logits.argmax(-1).item())

    classify(indices[0])  # warm-up
    start = time.perf_counter()
    for index in indices:
        classify(index)
    return {"images": len(indices), "start": start, "end": time.perf_counter()}


def _combine(per_rank: list[dict]) -> dict:
    """All ranks' images over the span from the first start to the last end."""
    images = sum(r["images"] for r in per_rank)
    seconds = max(r["end"] for r in per_rank) - min(r["start"] for r in per_rank)
    return {"images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2) if seconds > 0 else None}


def _combine_rounds(per_rank: list[list[dict]]) -> dict:
    """Combine each round over the ranks; report the median round, list every round's rate."""
    rounds = [_combine([rank_rounds[i] for rank_rounds in per_rank]) for i in range(len(per_rank[0]))]
    if len(rounds) == 1:
        return rounds[0]
    ordered = sorted(rounds, key=lambda r: r["images_per_s"] or 0)
    return {**ordered[len(ordered) // 2], "rounds": [r["images_per_s"] for r in rounds]}


def stage_large_photos(spec, items: Items, indices: list[int], inference, resources: Resources,
                       plan: BenchPlan) -> dict:
    """The workers' decode on upscaled photos, reduced_decode auto vs off (main rank only)."""
    if inference.input_path.spec is None:
        return {"skipped": f"the input path is the checkpoint's processor ({inference.input_path.note})"}
    sources = [items.paths[i] if items.paths is not None else items.open(i)
               for i in indices[:plan.large_photos]]
    return over_sizes(sources, plan.large_sizes or parse_sizes(DEFAULT_SIZES),
                      lambda paths: measure_large_photos(inference.input_path.spec, paths,
                                                         spec.runtime.max_image_pixels,
                                                         spec.runtime.batch_size, resources))


@dataclass
class BenchPlan:
    """What the bench runs: its stages, how many images, how many rounds, where it writes."""

    stages: list[str]
    bench_dir: Path
    limit: int | None = None
    baseline_limit: int | None = None
    rounds: int = 4
    large_photos: int = 16
    large_sizes: list[tuple[int, int]] | None = None


def run_bench(spec: JobSpec, plan: BenchPlan) -> dict | None:
    stages, limit, baseline_limit = plan.stages, plan.limit, plan.baseline_limit
    bench_dir, rounds, large_photos = plan.bench_dir, plan.rounds, plan.large_photos
    state = init_state(spec.runtime.device, spec.runtime.timeout_s)
    configure_logging(state.process_index, state.is_main_process)
    device = state.device
    spec = resolve_runtime(spec, device)
    resources = Resources.plan(state, spec.runtime.num_workers)
    torch.set_num_threads(resources.threads)
    memory = keep_host_memory(device, spec.runtime.keep_host_memory)
    # One item past the limit tells whether the input is larger, without holding all of it (a
    # WebDataset's images would all be read into memory).
    items = load_items(spec.data, None if limit is None else limit + 1)
    total = len(items) if limit is None else min(limit, len(items))
    if "job" in stages and total < len(items) and items.paths is None:
        # Checked before any stage runs: the job stage of a limited bench reads a file list.
        raise ConfigError("bench.limit with the job stage needs a file-based data.path (a folder or "
                          "file list); leave out the job stage (--bench.stages) or bench.limit")
    mine = list(range(state.process_index, total, state.num_processes))
    baseline = mine if baseline_limit is None else mine[:max(1, baseline_limit // state.num_processes)]
    loaded = load_model(spec.model, device)
    inference = prepare_inference(loaded, spec.runtime, device)
    described = inference.describe()
    log.info("bench: %d image(s) over %d rank(s) on %s; %s", total, state.num_processes, device,
             described)
    _read_once(items, mine)
    results: dict[str, dict] = {}
    pipeline_result, ready = stage_pipeline(spec, items, mine, inference, resources)
    if not ready:
        raise RuntimeError("bench: none of this rank's images could be decoded")
    if "pipeline" in stages:
        results["pipeline"] = [pipeline_result]
    large = None
    if "large_photos" in stages and large_photos > 0 and state.is_main_process:
        large = stage_large_photos(spec, items, list(range(total)), inference, resources, plan)
    state.wait_for_everyone()
    # The baselines first: the model-only rounds and the job then run back to back, so that
    # a shared machine's drift moves both sides of job/model alike.
    if "hf_pipeline" in stages:
        results["hf_pipeline"] = [stage_hf_pipeline(spec, items, baseline, device)]
        state.wait_for_everyone()
    if "seed_loop" in stages:
        results["seed_loop"] = [stage_seed_loop(spec, items, baseline, device)]
        state.wait_for_everyone()
    # Several rounds: the model alone is the ceiling, and one round of it is the noisiest
    # figure on a shared machine. With the job stage, half the rounds run before the job and
    # half after it, so the machine's drift during the job weighs on both sides of job/model.
    # The median round is reported, every round recorded.
    model_results, job_timing = [], None
    job_turn = rounds - rounds // 2 if "model" in stages else 0
    for turn in range(rounds + 1):
        if turn == job_turn and "job" in stages:
            job_timing = _stage_job(spec, items, total, bench_dir, state)
        if turn < rounds and "model" in stages:
            model_results.append(stage_model(spec, loaded, inference, device, len(mine), ready))
            state.wait_for_everyone()
    if model_results:
        results["model"] = model_results
    del ready
    del loaded, inference
    from accelerate.utils import gather_object

    gathered = gather_object([results]) if state.num_processes > 1 else [results]
    state.destroy_process_group()
    if not state.is_main_process:
        return None
    report = {
        "device": device_name(device),
        "world_size": state.num_processes,
        "settings": {"model": spec.model.name, "data": spec.data.path, "images": total,
                     "batch_size": spec.runtime.batch_size,
                     "precision": spec.runtime.precision, "threads_per_rank": resources.threads,
                     "workers_per_rank": resources.workers, "preprocess": spec.runtime.preprocess,
                     "decode": spec.runtime.decode, "host_memory": memory or "default",
                     "input_path_and_model": described},
        "versions": versions(),
        "stages": {name: _combine_rounds([r[name] for r in gathered])
                   for name in STAGES if name in gathered[0]},
    }
    if large is not None:
        report["large_photos"] = large
    if job_timing is not None:
        report["stages"]["job"] = {"images": job_timing["items_this_run"],
                                   "seconds": round(job_timing["seconds"], 3),
                                   "images_per_s": round(job_timing["images_per_second"], 2)}
    rates = {name: stage.get("images_per_s") for name, stage in report["stages"].items()}
    report["ratios"] = {name: round(rates[a] / rates[b], 3) for name, (a, b) in RATIOS.items()
                        if rates.get(a) and rates.get(b)}
    (bench_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_bench(report), flush=True)
    return report


def _stage_job(spec: JobSpec, items: Items, total: int, bench_dir: Path, state) -> dict | None:
    """The full job over the bench's images, in bench_dir/job; the main rank returns its timing."""
    from batch_classify.run.job import run

    job_spec = replace(spec, output=replace(spec.output, dir=str(bench_dir / "job"), overwrite=True))
    if total < len(items):
        listing = _limited_list(items, total, bench_dir, state)
        job_spec = replace(job_spec, data=replace(spec.data, path=str(listing), kind="file_list",
                                                  labels=None))
    if state.is_main_process:
        remove_output(bench_dir / "job")  # a fresh job each time, never a resume
    state.wait_for_everyone()
    run(job_spec, leave_process_group=False)
    if not state.is_main_process:
        return None
    return json.loads((bench_dir / "job" / "timing.json").read_text())


def _read_once(items: Items, indices: list[int]) -> None:
    """Read this rank's files once, so that no stage pays for a cold page cache."""
    if items.paths is None:
        return
    for index in indices:
        with open(items.paths[index], "rb") as handle:
            while handle.read(1 << 20):
                pass


def _limited_list(items: Items, total: int, bench_dir: Path, state) -> Path:
    """A file list of the first ``total`` images, for the job stage of a limited bench."""
    path = bench_dir / "images.txt"
    if state.is_main_process:
        path.write_text("".join(f"{Path(p).resolve()}\n" for p in items.paths[:total]))
    state.wait_for_everyone()
    return path


def format_bench(report: dict) -> str:
    lines = [f"device: {report['device']}, {report['world_size']} rank(s), "
             f"batch {report['settings']['batch_size']}, {report['settings']['precision']}"]
    for name in STAGES:
        stage = report["stages"].get(name)
        if stage:
            lines.append(f"  {name:<12} {stage['images_per_s']:>10.1f} images/s "
                         f"({stage['images']} images, {stage['seconds']:.1f} s)")
    for name, value in report.get("ratios", {}).items():
        lines.append(f"  {name:<16} {value:.2f}")
    for size, figures in report.get("large_photos", {}).items():
        if size == "skipped":
            lines.append(f"  large photos skipped: {figures}")
            continue
        lines.append(f"  large photos {size} ({figures['images']} JPEGs), reduced_decode off / auto:")
        for setting in ("off", "auto"):
            lines.append(f"    {setting:<5} {figures[setting]['cpu_ms_per_image']:>8.1f} CPU ms/image, "
                         f"pipeline {figures[setting]['pipeline_images_per_s']:>7.1f} images/s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="batch-classify bench", description=__doc__.split("\n\n")[0],
        epilog="Every other option is a job option (--config FILE, --model.name ..., --runtime.*).")
    parser.add_argument("--bench.dir", dest="bench_dir", default="outputs/bench",
                        help="where bench.json and the job stage's output go (default outputs/bench)")
    parser.add_argument("--bench.limit", dest="limit", type=int, default=None,
                        help="use only the first N images")
    parser.add_argument("--bench.baseline_limit", dest="baseline_limit", type=int, default=None,
                        help="at most N images for the two baselines (they are slow)")
    parser.add_argument("--bench.rounds", dest="rounds", type=int, default=4,
                        help="rounds of the model-only stage, half of them before the job stage "
                             "and half after it; the median is reported (default 4)")
    every = (*STAGES, *EXTRA_STAGES)
    parser.add_argument("--bench.stages", dest="stages", default=",".join(every),
                        help=f"comma-separated subset of {','.join(every)}")
    parser.add_argument("--bench.large_photos", dest="large_photos", type=int, default=None,
                        help="large_photos stage: how many of the bench's images to upscale "
                             "(default 16; with several models 0: set it to measure the pass's "
                             "decode on photos)")
    parser.add_argument("--bench.large_sizes", dest="large_sizes", default=DEFAULT_SIZES,
                        help="large_photos stage: comma-separated WIDTHxHEIGHT sizes (default "
                             "4032x3024, 12 MP; 5656x4242 is 24 MP, 8000x6000 48 MP)")
    args, rest = parser.parse_known_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(every))
    try:
        if unknown:
            raise ConfigError(f"bench.stages: unknown stage(s) {unknown}; choose from {list(every)}")
        try:
            large_sizes = parse_sizes(args.large_sizes)
        except ValueError as error:
            raise ConfigError(f"bench.large_sizes: {error}") from None
        if args.large_photos is not None and args.large_photos < 0:
            raise ConfigError(f"bench.large_photos: must be >= 0, got {args.large_photos}")
        for name, value in (("rounds", args.rounds), ("limit", args.limit),
                            ("baseline_limit", args.baseline_limit)):
            if value is not None and value < 1:
                raise ConfigError(f"bench.{name}: must be >= 1, got {value}")
        # The job stage writes under bench.dir, never into the config's own output folder.
        spec = parse_args([*rest, "--output.dir", str(Path(args.bench_dir) / "job")],
                          prog="batch-classify bench")
        given = sorted({a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)}
                       & set(SINGLE_MODEL_OPTIONS))
        if len(spec.models) > 1 and given:
            raise ConfigError(f"{', '.join(given)}: options of the one-model bench; with several models "
                              "bench runs them in one pass against one job per model, over all the images")
        bench_dir = Path(args.bench_dir)
        bench_dir.mkdir(parents=True, exist_ok=True)
        if len(spec.models) > 1:  # several models: one pass against one job per model
            from batch_classify.bench.models import run_models_bench

            run_models_bench(spec, bench_dir, args.large_photos or 0, large_sizes)
            return 0
        large_photos = 16 if args.large_photos is None else args.large_photos
        run_bench(spec, BenchPlan(stages, bench_dir, args.limit, args.baseline_limit, args.rounds,
                                  large_photos, large_sizes))
    except ConfigError as error:
        print(f"batch-classify bench: configuration error: {error}", file=sys.stderr)
        return 2
    return 0
