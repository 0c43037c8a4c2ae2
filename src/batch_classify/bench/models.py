"""``batch-classify bench`` with several models: one pass over the images against one job per model.

The same images, device, batch size and precision; each side is the real job, writing
Parquet, fresh (never a resume). The order is pass, separate jobs, pass again, so a shared
machine's drift weighs on both sides; the faster of the two passes is reported next to the
separate jobs' sum. Times are the jobs' own (first batch to last write: decode, models,
writes; not start-up) and the wall clock around each run (with model loading and listing).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from batch_classify.bench.large_photos import measure_pass, over_sizes
from batch_classify.core.config import JobSpec
from batch_classify.core.layout import MODELS_FILE
from batch_classify.core.ownership import remove_output
from batch_classify.inputs.listing import load_items
from batch_classify.models.model import load_model
from batch_classify.pipeline.distributed import Resources, init_state
from batch_classify.pipeline.preprocess import choose_input_path
from batch_classify.run.job import resolve_runtime, run


def _fresh(spec: JobSpec, folder: Path, state) -> JobSpec:
    if state.is_main_process:
        remove_output(folder)
    state.wait_for_everyone()
    return replace(spec, output=replace(spec.output, dir=str(folder), overwrite=True))


def _job_seconds(folder: Path) -> float:
    """First batch to last write of a job (of a pass: every model shares it)."""
    models = folder / MODELS_FILE
    if models.exists():
        folder = folder / json.loads(models.read_text())["models"][0]["folder"]
    return json.loads((folder / "timing.json").read_text())["seconds"]


def _timed(spec: JobSpec, folder: Path, state) -> dict[str, float] | None:
    spec = _fresh(spec, folder, state)
    started = time.perf_counter()
    run(spec, leave_process_group=False)
    state.wait_for_everyone()
    wall = time.perf_counter() - started
    return {"seconds": _job_seconds(folder), "wall_seconds": wall} if state.is_main_process else None


def pass_photos(spec: JobSpec, resources: Resources, count: int, sizes: list[tuple[int, int]]) -> dict:
    """The pass's workers on ``count`` of the images upscaled to each size: one decode for every
    model's resize and crop, reduced_decode off (every pixel) against auto (one reduced decode
    covering twice the largest target). CPU per image and the loader's rate, no model."""
    specs = []
    for name in spec.models:
        single = spec.for_model(name, spec.output.dir)
        loaded = load_model(single.model, torch.device("cpu"))
        path = choose_input_path(loaded.processor, loaded.transform, single.runtime.preprocess)
        if path.spec is None:
            return {"skipped": f"{name}: the input path is the checkpoint's processor ({path.note})"}
        specs.append(path.spec)
        del loaded
    items = load_items(spec.data, count)
    sources = [items.paths[i] if items.paths is not None else items.open(i)
               for i in range(min(count, len(items)))]
    return over_sizes(sources, sizes, lambda paths: measure_pass(
        specs, paths, spec.runtime.max_image_pixels, spec.runtime.batch_size, resources))


def run_models_bench(spec: JobSpec, bench_dir: Path, large_photos: int = 0,
                     large_sizes: list[tuple[int, int]] | None = None) -> dict[str, Any] | None:
    """k models in one pass against k separate jobs; the main rank writes bench_models.json.
    With ``large_photos`` the main rank first measures the pass's decode on upscaled photos."""
    state = init_state(spec.runtime.device, spec.runtime.timeout_s)
    names = spec.models
    photos = None
    if large_photos > 0 and state.is_main_process:
        resolved = resolve_runtime(spec, state.device)
        photos = pass_photos(resolved, Resources.plan(state, resolved.runtime.num_workers), large_photos,
                             large_sizes or [(4032, 3024)])
    state.wait_for_everyone()
    passes, separate = [], {}
    passes.append(_timed(spec, bench_dir / "pass", state))
    for index, name in enumerate(names):
        single = spec.for_model(name, spec.output.dir)
        separate[name] = _timed(single, bench_dir / f"alone-{index}", state)
    passes.append(_timed(spec, bench_dir / "pass", state))
    state.destroy_process_group()
    if not state.is_main_process:
        return None
    models_file = json.loads((bench_dir / "pass" / MODELS_FILE).read_text())
    # The mean of the pass before and the pass after the separate jobs: drift weighs on both sides
    # alike (the faster of the two would favour the pass).
    one = {key: sum(p[key] for p in passes) / len(passes) for key in ("seconds", "wall_seconds")}
    total = {key: sum(s[key] for s in separate.values()) for key in ("seconds", "wall_seconds")}
    report = {
        "models": names,
        "world_size": state.num_processes,
        "device": str(state.device),
        "batch_size": spec.runtime.batch_size,
        "precision": spec.runtime.precision,
        "data": spec.data.path,
        "one_pass": one,
        "one_pass_rounds": passes,
        "separate_jobs": separate,
        "separate_total": total,
        "ratio_separate_over_one_pass": round(total["seconds"] / one["seconds"], 3),
        "ratio_wall": round(total["wall_seconds"] / one["wall_seconds"], 3),
        "folders": models_file["models"],
    }
    if photos is not None:
        report["large_photos"] = photos
    (bench_dir / "bench_models.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_models_bench(report), flush=True)
    return report


def format_models_bench(report: dict[str, Any]) -> str:
    lines = [f"{len(report['models'])} models, {report['world_size']} rank(s) on {report['device']}, "
             f"batch {report['batch_size'] or 'auto'}, {report['precision']}",
             f"  one pass (mean)   {report['one_pass']['seconds']:8.2f} s  "
             f"(wall {report['one_pass']['wall_seconds']:.2f} s, the side-by-side table included)"]
    for name, timing in report["separate_jobs"].items():
        lines.append(f"  alone {Path(name).name:<11} {timing['seconds']:8.2f} s  "
                     f"(wall {timing['wall_seconds']:.2f} s)")
    lines += [f"  separate, summed  {report['separate_total']['seconds']:8.2f} s  "
              f"(wall {report['separate_total']['wall_seconds']:.2f} s)",
              f"  separate / one pass  {report['ratio_separate_over_one_pass']:.2f}x "
              f"(wall {report['ratio_wall']:.2f}x)"]
    for size, figures in report.get("large_photos", {}).items():
        if size == "skipped":
            lines.append(f"  large photos skipped: {figures}")
            continue
        lines.append(f"  large photos {size} ({figures['images']} JPEGs), the pass's decode, reduced_decode "
                     f"off / auto ({figures['auto_decode'] or 'every pixel'}):")
        off, auto = figures["off"], figures["auto"]
        lines.append(f"    CPU ms/image {off['cpu_ms_per_image']:.1f} / {auto['cpu_ms_per_image']:.1f} "
                     f"({figures['cpu_off/auto']}x less), loader images/s "
                     f"{off['pipeline_images_per_s']:.1f} / {auto['pipeline_images_per_s']:.1f}")
    return "\n".join(lines)
