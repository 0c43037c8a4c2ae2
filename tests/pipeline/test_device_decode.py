"""runtime.decode device: JPEGs decoded by the rank in batches give the workers' answers.

On this CPU-only machine the "device" is the CPU, so the same code runs as on a GPU, with
torchvision's CPU JPEG decoder in place of nvJPEG.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import read_rows, run_job
from fixtures_images import jpeg_bytes, photo, write_bad_images, write_exif_pair, write_good_images
from PIL import Image
from transformers import BeitImageProcessor, MobileNetV1ImageProcessor

from batch_classify.core.config import ConfigError, RuntimeConfig
from batch_classify.inputs.listing import Items
from batch_classify.models.model import ProcessorTransform
from batch_classify.pipeline import device_decode
from batch_classify.pipeline.decode import Encoded, ItemKey, Task, TaskDataset, collate
from batch_classify.pipeline.device_decode import DeviceDecode, decode_on_device, unavailable
from batch_classify.pipeline.preprocess import FastTransform, choose_input_path, pixel_spec

CPU = torch.device("cpu")
LIMIT = 128_000_000


def _items(folder) -> Items:
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    return Items(kind="images", root=str(folder), ids=[p[len(str(folder)) + 1:] for p in paths],
                 labels=[None] * len(paths), payloads=paths, classes=None, notes=[])


def _samples(items: Items, indices: list[int], preprocess) -> list:
    """The job's decode of the items at ``indices``, as its loaders call it."""
    dataset = TaskDataset(preprocess, LIMIT)
    return [dataset[Task(ItemKey(0, items.ids[i], None), items.payloads[i])] for i in indices]


def _mixed_folder(root):
    write_good_images(root / "good")
    write_bad_images(root / "bad")
    write_exif_pair(root / "exif")
    whole = jpeg_bytes(photo((320, 240)))
    (root / "bad" / "cut.jpg").write_bytes(whole[: len(whole) * 3 // 5])  # header intact
    return root


def test_device_decoding_gives_the_workers_batch(tmp_path):
    items = _items(_mixed_folder(tmp_path / "mixed"))
    spec = pixel_spec(MobileNetV1ImageProcessor())
    fast = FastTransform(spec)
    indices = list(range(len(items.ids)))
    reference = collate(_samples(items, indices, fast))
    path = decode_on_device(choose_input_path(MobileNetV1ImageProcessor(),
                                              ProcessorTransform(MobileNetV1ImageProcessor()),
                                              "fast"), CPU)
    raw = collate(_samples(items, indices, path.worker))
    decoded_ids = [items.ids[i] for i, ok in zip(indices, raw.ok) if ok]
    encoded = [item_id for item_id, value in zip(decoded_ids, raw.pixel_values)
               if isinstance(value, Encoded)]
    # Only plain upright JPEGs are left encoded; the cut one passes its header check.
    assert sorted(encoded) == ["bad/cut.jpg", "good/rgb.jpg"]
    batch = path.finish_decoding(raw)
    assert batch.ok == reference.ok
    # the cut JPEG fails on the device, then in Pillow: the workers' error row
    assert batch.errors == reference.errors
    assert batch.errors[items.ids.index("bad/cut.jpg")].startswith("OSError: image file is truncated")
    assert torch.equal(batch.pixel_values, reference.pixel_values)


def test_a_batch_of_only_good_jpegs_decodes_in_one_call(tmp_path, monkeypatch):
    write_good_images(tmp_path)
    for copy in range(3):
        (tmp_path / f"copy{copy}.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes())
    items = _items(tmp_path)
    calls = []
    real = device_decode.decode_jpeg

    def counting(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", counting)
    spec = pixel_spec(MobileNetV1ImageProcessor())
    jpegs = [i for i, name in enumerate(items.ids) if name.endswith(".jpg") and "cmyk" not in name]
    raw = collate(_samples(items, jpegs, device_decode.Passthrough(FastTransform(spec))))
    batch = DeviceDecode(spec, CPU)(raw)
    assert calls == [4] and batch.pixel_values.shape == (4, 224, 224, 3) and all(batch.ok)


def test_without_a_device_decoder_the_workers_decode(monkeypatch, caplog):
    def refusing(*args, **kwargs):
        raise RuntimeError("torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(device_decode, "decode_jpeg", refusing)
    assert "nvJPEG" in unavailable(CPU)
    processor = MobileNetV1ImageProcessor()
    path = choose_input_path(processor, ProcessorTransform(processor), "fast")
    with caplog.at_level(logging.WARNING):
        kept = decode_on_device(path, CPU)
    assert kept.device_decode is None and isinstance(kept.worker, FastTransform)
    assert "decoded in the workers" in kept.note and "runtime.decode device" in caplog.text


def test_a_resize_filter_only_pillow_has_keeps_decoding_in_the_workers(tmp_path):
    # A Lanczos processor: the device could decode, but not resize as the processor does.
    processor = BeitImageProcessor(do_center_crop=True, resample=Image.Resampling.LANCZOS)
    path = choose_input_path(processor, ProcessorTransform(processor), "fast")
    kept = decode_on_device(path, CPU)
    assert kept.device_decode is None and "LANCZOS" in kept.note
    write_good_images(tmp_path)
    items = _items(tmp_path)
    sample = _samples(items, [items.ids.index("rgb.jpg")], kept.worker)[0]
    assert sample.error is None and sample.pixel_values.shape == (224, 224, 3)


def test_the_processor_path_keeps_decoding_in_the_workers():
    processor = MobileNetV1ImageProcessor()
    path = choose_input_path(processor, ProcessorTransform(processor), "processor")
    assert decode_on_device(path, CPU).device_decode is None
    with pytest.raises(ConfigError, match="runtime.decode"):
        RuntimeConfig(decode="device", preprocess="processor")


def test_job_with_device_decoding_matches_the_default_job(tmp_path, tiny_models):
    folder = _mixed_folder(tmp_path / "mixed")
    outputs = {}
    for decode in ("cpu", "device"):
        outputs[decode] = tmp_path / decode
        run_job(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(folder),
                 "--data.kind", "images", "--output.dir", str(outputs[decode]),
                 "--runtime.batch_size", "4", "--runtime.decode", decode,
                 "--runtime.num_workers", "1"], processes=2)  # encoded JPEGs cross processes
    default, device = read_rows(outputs["cpu"]), read_rows(outputs["device"])
    assert default.keys() == device.keys() and len(device) == 18
    for item_id, row in default.items():
        assert device[item_id]["error"] == row["error"], item_id
        assert device[item_id]["topk_ids"] == row["topk_ids"], item_id
    assert sum(row["error"] is not None for row in device.values()) == 7
    metadata = (outputs["device"] / "config.yaml").read_text()
    assert "decode: device" in metadata
