"""Names of the dataset's classes and of the model's outputs, as the report prints them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch_classify.core.labels import imagenet_classes


def shorten(imagenet_name: str) -> str:
    """The first of an ImageNet class's synonyms: 'tench, Tinca tinca' -> 'tench'."""
    return imagenet_name.split(",")[0].strip()


@dataclass
class ClassNames:
    """Names of the dataset's label indices and of the model's output indices."""

    label_wnids: list[str]
    label_names: list[str]
    model_imagenet: bool
    model_names: dict[int, str]

    def label(self, index: int, short: bool = False) -> str:
        if not 0 <= index < len(self.label_names):
            return f"class {index}"
        name = self.label_names[index]
        return shorten(name) if short and self.label_wnids[index] else name

    def label_wnid(self, index: int) -> str:
        return self.label_wnids[index] if 0 <= index < len(self.label_wnids) else ""

    def predicted(self, index: int, short: bool = False) -> str:
        if self.model_imagenet and 0 <= index < 1000:
            name = imagenet_classes()[1][index]
            return shorten(name) if short else name
        return self.model_names.get(index, f"class {index}")

    def predicted_wnid(self, index: int) -> str:
        return imagenet_classes()[0][index] if self.model_imagenet and 0 <= index < 1000 else ""


def model_is_imagenet(model: dict[str, Any]) -> bool:
    """Whether the model reports ImageNet-1k indices (as labels.model_labels decides)."""
    if "imagenet_ids" in model:
        return bool(model["imagenet_ids"])
    return model.get("num_labels") == 1000 or "background" in str(model.get("label_space", ""))


def class_names(manifest: dict[str, Any], model_names: dict[int, str]) -> ClassNames:
    classes = manifest["dataset"].get("classes", "imagenet-1k")
    if classes == "imagenet-1k":
        wnids, names = (list(c) for c in imagenet_classes())
    else:
        wnids, names = [""] * len(classes), [str(c) for c in classes]
    return ClassNames(wnids, names, model_is_imagenet(manifest.get("model", {})), model_names)
