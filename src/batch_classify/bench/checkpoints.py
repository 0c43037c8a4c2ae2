"""Random-weight copies of the benchmark checkpoints, for speed measurements without the hub.

Architecture and image processor follow the hub checkpoints (see the model presets in
configs/models); only the weights are random, which does not change the speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image


def _imagenet_id2label(background: bool = False) -> dict[int, str]:
    from batch_classify.core.labels import imagenet_classes

    names = list(imagenet_classes()[1])
    return dict(enumerate(["background", *names] if background else names))


def save_beit_base(folder: Path) -> Path:
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

    config = BeitConfig(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
                        id2label=_imagenet_id2label())
    BeitForImageClassification(config).save_pretrained(folder)
    BeitImageProcessor(size={"height": 224, "width": 224}, resample=Image.Resampling.BILINEAR,
                       do_center_crop=False, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_mobilenet_v1(folder: Path) -> Path:
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    config = MobileNetV1Config(id2label=_imagenet_id2label(background=True))
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                              resample=Image.Resampling.BILINEAR, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_efficientnet_b7(folder: Path) -> Path:
    from transformers import (
        EfficientNetConfig,
        EfficientNetForImageClassification,
        EfficientNetImageProcessor,
    )

    config = EfficientNetConfig(id2label=_imagenet_id2label())  # the defaults are B7 at 600
    EfficientNetForImageClassification(config).save_pretrained(folder)
    EfficientNetImageProcessor(size={"height": 600, "width": 600},
                               resample=Image.Resampling.NEAREST).save_pretrained(folder)
    return folder


PRESETS = {
    "beit-base-patch16-224": save_beit_base,
    "mobilenet-v1-1.0-224": save_mobilenet_v1,
    "efficientnet-b7": save_efficientnet_b7,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write one checkpoint folder per preset into")
    parser.add_argument("presets", nargs="*", default=sorted(PRESETS), help=f"any of {sorted(PRESETS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    torch.manual_seed(0)
    for name in args.presets:
        print(PRESETS[name](Path(args.out) / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
