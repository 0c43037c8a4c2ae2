"""Tiny randomly initialised checkpoints, saved with save_pretrained like real ones."""

from __future__ import annotations

from pathlib import Path

import torch

from batch_classify.labels import imagenet_classes


def _imagenet_id2label(background: bool = False) -> dict[int, str]:
    names = list(imagenet_classes()[1])
    if background:
        names = ["background", *names]
    return dict(enumerate(names))


def save_tiny_beit(folder: Path) -> Path:
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

    torch.manual_seed(0)
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, use_mean_pooling=True,
                        id2label=_imagenet_id2label())
    BeitForImageClassification(config).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_tiny_mobilenet_v1(folder: Path) -> Path:
    """1001 outputs with 'background' first, like google/mobilenet_v1_1.0_224."""
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    torch.manual_seed(0)
    config = MobileNetV1Config(image_size=32, depth_multiplier=0.25,
                               id2label=_imagenet_id2label(background=True))
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_tiny_efficientnet(folder: Path) -> Path:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification, EfficientNetImageProcessor

    torch.manual_seed(0)
    config = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=64, id2label=_imagenet_id2label())
    EfficientNetForImageClassification(config).save_pretrained(folder)
    EfficientNetImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


BUILDERS = {
    "beit": save_tiny_beit,
    "mobilenet_v1": save_tiny_mobilenet_v1,
    "efficientnet": save_tiny_efficientnet,
}
