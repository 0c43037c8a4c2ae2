"""The fast path: processor specs, device-side normalisation, model rewrites, OOM backoff."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_rows, run_job
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    BeitImageProcessor,
    ConvNextImageProcessor,
    EfficientNetImageProcessor,
    MobileNetV1ImageProcessor,
)

from batch_classify.core.labels import model_labels
from batch_classify.models.model import ProcessorTransform
from batch_classify.models.optimize import fold_batchnorm, optimise
from batch_classify.models.predict import OutOfMemory, Predictor, Scoring
from batch_classify.pipeline.preprocess import (
    DeviceNormalize,
    FastTransform,
    UnsupportedProcessor,
    check_spec,
    choose_input_path,
    pixel_spec,
    synthetic_images,
)

# The hub checkpoints' processor settings (field notes), plus variants with other steps.
PROCESSORS = {
    "beit-base-224": lambda: BeitImageProcessor(size={"height": 224, "width": 224},
                                                resample=Image.Resampling.BILINEAR,
                                                do_center_crop=False),
    "mobilenet-v1-224": lambda: MobileNetV1ImageProcessor(),
    "efficientnet-b7": lambda: EfficientNetImageProcessor(size={"height": 600, "width": 600},
                                                          resample=Image.Resampling.NEAREST),
    "efficientnet-offset": lambda: EfficientNetImageProcessor(rescale_offset=True),
    "convnext-224": lambda: ConvNextImageProcessor(size={"shortest_edge": 224}),
    "convnext-384": lambda: ConvNextImageProcessor(),
    "lanczos-with-crop": lambda: BeitImageProcessor(do_center_crop=True,
                                                    resample=Image.Resampling.LANCZOS),
}


def _processor_output(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0].float()


def _fast_output(spec, image) -> torch.Tensor:
    pixels = FastTransform(spec)(image).unsqueeze(0)
    return DeviceNormalize(spec, torch.device("cpu"), channels_last=False)(pixels)[0]


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_fast_path_reproduces_the_processor(name):
    processor = PROCESSORS[name]()
    spec = pixel_spec(processor)
    assert check_spec(ProcessorTransform(processor), spec) is None
    # On an image the check never saw, both outputs agree to within resampling rounding.
    image = Image.effect_mandelbrot((517, 311), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    reference, fast = _processor_output(processor, image), _fast_output(spec, image)
    assert fast.shape == reference.shape
    levels = ((fast - reference) / torch.tensor(spec.scale).view(3, 1, 1)).abs()
    assert levels.mean() < 1.0 and levels.max() <= 3.0, (levels.mean(), levels.max())


def test_timm_checkpoints_processor_is_read_from_its_eval_transform(tmp_path):
    from batch_classify.commands.demo import save_lite0_checkpoint

    folder = save_lite0_checkpoint(tmp_path / "lite0")
    processor = AutoImageProcessor.from_pretrained(folder)
    spec = pixel_spec(processor)
    assert (spec.resize, spec.size, spec.crop) == ("shortest", (256,), (224, 224))
    assert check_spec(ProcessorTransform(processor), spec) is None


def test_a_timm_checkpoint_loads_without_a_backend_fallback_message(tmp_path):
    """Its processor exists for PIL only: the job asks for that one, so no rank logs a fallback."""
    from batch_classify.commands.demo import save_lite0_checkpoint

    folder = save_lite0_checkpoint(tmp_path / "lite0")
    code = ("import torch; from batch_classify.core.config import ModelConfig; "
            "from batch_classify.models.model import load_model; "
            f"loaded = load_model(ModelConfig(name={str(folder)!r}), torch.device('cpu')); "
            "print(type(loaded.processor).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip()  # the processor loaded
    assert "backend is not available" not in result.stderr, result.stderr


class FlippingProcessor(MobileNetV1ImageProcessor):
    """A processor with a step the spec cannot see (a horizontal flip)."""

    def __call__(self, images, **kwargs):
        return super().__call__(images=images.transpose(Image.Transpose.FLIP_LEFT_RIGHT), **kwargs)


def test_a_processor_the_spec_misreads_falls_back_or_is_refused(caplog):
    processor = FlippingProcessor()
    reference = ProcessorTransform(processor)
    with caplog.at_level(logging.WARNING):
        chosen = choose_input_path(processor, reference, "auto")
    assert chosen.name == "processor" and chosen.worker is reference
    assert "fast path unavailable" in chosen.note and "uint8 levels" in chosen.note
    with pytest.raises(UnsupportedProcessor, match="runtime.preprocess"):
        choose_input_path(processor, reference, "fast")


def test_a_processor_with_unexpected_settings_falls_back_instead_of_crashing():
    processor = MobileNetV1ImageProcessor()
    processor.crop_size = {"shortest_edge": 224}  # not a height and width: unreadable crop
    reference = ProcessorTransform(processor)
    chosen = choose_input_path(processor, reference, "auto")
    assert chosen.name == "processor" and chosen.worker is reference
    assert "while reading the processor" in chosen.note
    with pytest.raises(UnsupportedProcessor, match="runtime.preprocess fast"):
        choose_input_path(processor, reference, "fast")


def test_unbatchable_processor_is_named():
    with pytest.raises(UnsupportedProcessor, match="does not resize"):
        pixel_spec(BeitImageProcessor(do_resize=False))


def test_device_normalise_gives_channels_last_or_contiguous():
    spec = pixel_spec(MobileNetV1ImageProcessor())
    batch = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    nhwc = DeviceNormalize(spec, torch.device("cpu"), channels_last=True)(batch)
    nchw = DeviceNormalize(spec, torch.device("cpu"), channels_last=False)(batch)
    assert nhwc.shape == nchw.shape == (2, 3, 224, 224)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    expected = batch.permute(0, 3, 1, 2).float() / 255 * 2 - 1  # mean = std = 0.5
    torch.testing.assert_close(nchw, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(nhwc, expected, atol=1e-5, rtol=0)


# Model rewrites ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v1", "efficientnet"])
def test_batchnorm_folding_keeps_the_logits(name, tiny_models):
    model = AutoModelForImageClassification.from_pretrained(tiny_models[name]).eval()
    example = torch.randn(3, 3, 32, 32)
    folded, count = fold_batchnorm(model, example)
    def norms(m):
        return sum(isinstance(module, torch.nn.BatchNorm2d) for module in m.modules())

    assert count > 0 and norms(folded) == norms(model) - count
    fresh = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(pixel_values=fresh).logits, model(pixel_values=fresh).logits,
                                   atol=1e-4, rtol=1e-4)


class _Output:
    def __init__(self, logits):
        self.logits = logits


class SharedConvOutput(torch.nn.Module):
    """conv -> BatchNorm, but the raw conv output is also added back: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)

    def forward(self, pixel_values):
        raw = self.conv(pixel_values)
        mixed = self.conv2(self.bn(raw) + raw)
        return _Output(self.head(mixed.mean((2, 3))))


def test_folding_that_would_change_the_logits_is_undone():
    model = SharedConvOutput().eval()
    example = torch.randn(2, 3, 16, 16)
    result = optimise(model, example, fold=True, channels_last=False, compile_model=False)
    assert result.model is model
    assert "BatchNorm folding skipped" in " ".join(result.notes)


def test_channels_last_only_for_convolutional_networks(tiny_models):
    beit = AutoModelForImageClassification.from_pretrained(tiny_models["beit"]).eval()
    mobilenet = AutoModelForImageClassification.from_pretrained(tiny_models["mobilenet_v1"]).eval()
    example = torch.randn(2, 3, 32, 32)
    assert optimise(beit, example, True, None, False).channels_last is False
    assert optimise(mobilenet, example, True, None, False).channels_last is True
    assert optimise(mobilenet, example, True, False, False).channels_last is False


# Predictor: out-of-memory backoff and padding ------------------------------------------

class MemoryLimited(torch.nn.Module):
    """Raises the device's out-of-memory error above ``limit`` images per forward pass."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []
        self.linear = torch.nn.Linear(3, 10)

    def forward(self, pixel_values):
        self.sizes.append(len(pixel_values))
        if len(pixel_values) > self.limit:
            raise OutOfMemory("CUDA out of memory (simulated)")
        return _Output(self.linear(pixel_values.mean((2, 3))))


def _labels():
    return model_labels({i: f"class {i}" for i in range(10)}, 10)


def test_out_of_memory_halves_the_chunk_and_keeps_every_answer(caplog):
    torch.manual_seed(0)
    batch = torch.randn(13, 3, 4, 4)
    model = MemoryLimited(limit=4)
    reference = Predictor(MemoryLimited(limit=100), _labels(), torch.device("cpu"), lambda x: x,
                          Scoring("fp32", 3))
    reference.model.load_state_dict(model.state_dict())
    predictor = Predictor(model, _labels(), torch.device("cpu"), lambda x: x, Scoring("fp32", 3))
    with caplog.at_level(logging.WARNING):
        ids, scores = predictor(batch)
    assert len(ids) == 13
    expected_ids, expected_scores = reference(batch)
    assert ids == expected_ids
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected_scores))
    assert predictor.max_chunk == 3 and max(model.sizes[-5:]) <= 3
    assert "out of device memory" in caplog.text
    model.sizes.clear()
    predictor(batch)  # later batches start at the smaller size: no more failures
    assert max(model.sizes) <= 3


def test_out_of_memory_at_one_image_is_raised():
    predictor = Predictor(MemoryLimited(limit=0), _labels(), torch.device("cpu"), lambda x: x,
                          Scoring("fp32", 3))
    with pytest.raises(OutOfMemory):
        predictor(torch.randn(2, 3, 4, 4))


def test_padding_a_short_batch_changes_no_answer():
    torch.manual_seed(0)
    model = MemoryLimited(limit=100)
    batch = torch.randn(5, 3, 4, 4)
    plain = Predictor(model, _labels(), torch.device("cpu"), lambda x: x, Scoring("fp32", 3))
    padded = Predictor(model, _labels(), torch.device("cpu"), lambda x: x, Scoring("fp32", 3, pad_to=8))
    assert padded(batch) == plain(batch)
    assert model.sizes[-1] == 5 and model.sizes[-2] == 8


# The job on both paths ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenet_v1", "efficientnet", "beit"])
def test_job_on_the_fast_and_the_reference_path_agree(name, tiny_models, corpus, tmp_path):
    runs = {}
    for path in ("fast", "processor"):
        out = tmp_path / path
        extra = [] if path == "fast" else ["--runtime.fold_batchnorm", "false",
                                           "--runtime.channels_last", "false"]
        run_job(["--model.name", str(tiny_models[name]), "--data.path", str(corpus),
                 "--output.dir", str(out), "--runtime.preprocess", path, *extra])
        assert json.loads((out / "timing.json").read_text())["input_path"] == path
        runs[path] = read_rows(out)
    fast, reference = runs["fast"], runs["processor"]
    assert set(fast) == set(reference)
    for item_id in fast:
        assert fast[item_id]["topk_ids"][0] == reference[item_id]["topk_ids"][0], item_id
        assert fast[item_id]["topk_scores"][0] == pytest.approx(
            reference[item_id]["topk_scores"][0], abs=0.02)


def test_synthetic_check_images_cover_both_orientations_and_small_inputs():
    sizes = [image.size for image in synthetic_images()]
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert min(min(size) for size in sizes) < 64


@pytest.mark.parametrize("overlap", [False, True])
def test_the_batch_loop_writes_every_row_once_with_and_without_overlap(overlap, tiny_models,
                                                                        corpus, tmp_path):
    """The GPU loop (next batch queued before the previous one is collected), run on the CPU."""
    import numpy as np

    from batch_classify.core.config import load_spec
    from batch_classify.core.preemption import StopFlag
    from batch_classify.inputs.listing import write_listing
    from batch_classify.models.model import load_model, prepare_inference
    from batch_classify.output.progress import Progress
    from batch_classify.pipeline.distributed import Resources
    from batch_classify.pipeline.shard import UnitQueue
    from batch_classify.run.job import ModelJob, RankLoop, RankWork, resolve_runtime

    (tmp_path / "job.yaml").write_text(
        f"model: {{name: {tiny_models['mobilenet_v1']}}}\ndata: {{path: {corpus}}}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\nruntime: {{batch_size: 2, device: cpu}}\n")
    device = torch.device("cpu")
    spec = resolve_runtime(load_spec(tmp_path / "job.yaml"), device)
    listing = write_listing(spec.data, tmp_path / "out", unit_size=3)
    loaded = load_model(spec.model, device)
    inference = prepare_inference(loaded, spec.runtime, device)
    mine = [0, 2, 3]  # not every unit: rows must land in the right files
    job = ModelJob(spec, tmp_path / "out", loaded.labels, {}, None, loaded, inference, {})
    work = RankWork(listing, UnitQueue(np.array(mine)), [job])
    progress = Progress(listing.n_items, 0, False, 10.0)
    timing = RankLoop(spec, work, Resources(device, threads=2, workers=0), progress, StopFlag()).run(overlap)
    progress.close()
    expected = {u: [r.id for r in listing.records(u)] for u in mine}
    assert timing["items"] == sum(map(len, expected.values())) == 3 + 3 + 2
    written = sorted(p.name for p in (tmp_path / "out" / "predictions").glob("*.parquet"))
    assert written == [f"unit-{u:06d}.parquet" for u in mine]
    for unit, ids in expected.items():
        table = pq.read_table(tmp_path / "out" / "predictions" / f"unit-{unit:06d}.parquet")
        assert table.column("id").to_pylist() == ids
    rows = read_rows(tmp_path / "out")
    assert all(r["topk_ids"] is not None for r in rows.values())


def test_decode_threads_instead_of_worker_processes_give_the_same_rows(tiny_models, corpus, tmp_path):
    """runtime.num_workers 0: batches decoded on the rank's threads (no /dev/shm needed)."""
    runs = {}
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        run_job(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(corpus),
                 "--output.dir", str(out), "--runtime.num_workers", workers,
                 "--runtime.batch_size", "3"])
        runs[workers] = read_rows(out)
    assert runs["0"] == runs["1"] and len(runs["0"]) == 11


# Threads and workers from the rank's cores ---------------------------------------------

class _State:
    def __init__(self, device: str):
        self.device = torch.device(device)


@pytest.mark.parametrize(("device", "expected"), [("cpu", (4, 0)), ("cuda", (2, 3))])
def test_threads_and_workers_come_from_the_ranks_share_of_slurms_cores(monkeypatch, device, expected):
    import os

    from batch_classify.pipeline.distributed import plan_cpu

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert plan_cpu(_State(device), None) == expected
    assert plan_cpu(_State(device), 5)[1] == 5  # an explicit runtime.num_workers wins


def test_without_slurm_the_affinity_mask_counts(monkeypatch):
    import os

    from batch_classify.pipeline.distributed import available_cores, plan_cpu

    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert available_cores() == len(os.sched_getaffinity(0))
    assert plan_cpu(_State("cpu"), None)[0] == len(os.sched_getaffinity(0))


def test_default_batch_size_depends_on_the_device(tiny_models, tmp_path):
    from batch_classify.core.config import load_spec
    from batch_classify.run.job import resolve_runtime

    (tmp_path / "job.yaml").write_text(f"model: {{name: {tiny_models['beit']}}}\n"
                                       f"data: {{path: x}}\noutput: {{dir: {tmp_path}}}\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.runtime.batch_size is None
    cpu = resolve_runtime(spec, torch.device("cpu")).runtime.batch_size
    gpu = resolve_runtime(spec, torch.device("cuda")).runtime.batch_size
    assert (cpu, gpu) == (16, 64)
    explicit = load_spec(tmp_path / "job.yaml", ["--runtime.batch_size", "7"])
    assert resolve_runtime(explicit, torch.device("cpu")).runtime.batch_size == 7


def test_cpu_ranks_keep_freed_host_memory():
    import ctypes.util

    from batch_classify.pipeline.distributed import keep_host_memory

    assert keep_host_memory(torch.device("cpu"), enabled=False) is None
    assert keep_host_memory(torch.device("cuda"), enabled=True) is None  # GPU ranks: untouched
    if "libc.so" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("not a glibc system: the allocator is left alone")
    assert "no mmap, no trimming" in keep_host_memory(torch.device("cpu"), enabled=True)


def test_a_restricted_affinity_mask_caps_slurms_count_and_is_warned(monkeypatch, caplog):
    import os

    from batch_classify.pipeline.distributed import available_cores, cpu_mask_warning, plan_cpu

    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "128")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # the step bound to one core
    assert available_cores() == 1
    with caplog.at_level("WARNING"):
        assert plan_cpu(_State("cuda"), None) == (1, 1)
    assert "may run on 1 CPU(s)" in caplog.text and "--cpus-per-task=128" in caplog.text
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100)))
    assert available_cores() == 100 and cpu_mask_warning() is None  # near the allocation: quiet
