"""Label spaces: the ImageNet-1k index, a model's outputs, and how dataset labels map onto them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names) of ImageNet-1k in the standard sorted-wnid order."""
    text = resources.files("batch_classify").joinpath("imagenet1k_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_classes()[0])}


def parse_imagenet_label(value: str, where: str) -> int:
    """An ImageNet-1k label given as an index (0-999) or a wnid; ValueError names `where`."""
    value = value.strip()
    if WNID.match(value):
        index = wnid_to_index().get(value)
        if index is None:
            raise ValueError(f"{where}: {value!r} is not one of the 1000 ImageNet-1k wnids")
        return index
    try:
        index = int(value)
    except ValueError:
        raise ValueError(
            f"{where}: label {value!r} is neither an ImageNet-1k index (0-999) nor a wnid"
        ) from None
    if not 0 <= index < 1000:
        raise ValueError(f"{where}: label index {index} is outside ImageNet-1k's 0-999")
    return index


@dataclass(frozen=True)
class ModelLabels:
    """How a model's logits become reported classes."""

    first_logit: int
    """Logits before this one are dropped (1 for a 'background' class 0)."""
    names: tuple[str, ...]
    """Name of each reported class, in output order."""
    imagenet: bool
    """Whether the reported classes are ImageNet-1k in the standard order."""
    note: str


def model_labels(id2label: dict[int, str], num_labels: int) -> ModelLabels:
    """Work out a classifier's label space from its config."""
    names = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels))
    if num_labels == 1001 and "background" in names[0].lower():
        return ModelLabels(
            1, names[1:], True, "1001 outputs with 'background' first: logit 0 dropped, rest shifted"
        )
    if num_labels == 1000:
        return ModelLabels(0, names, True, "1000 outputs: ImageNet-1k order")
    return ModelLabels(0, names, False, f"{num_labels} outputs: the model's own classes")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def label_targets(
    dataset_classes: tuple[str, ...] | None, model: ModelLabels
) -> tuple[list[int] | None, str | None]:
    """Map dataset label indices onto model output indices.

    ``dataset_classes`` None means the dataset's labels are ImageNet-1k indices.
    Returns (target of each dataset label, None) or (None, why accuracy is unavailable).
    """
    if dataset_classes is None:
        if model.imagenet:
            return list(range(1000)), None
        return None, (
            f"the dataset is labelled in ImageNet-1k but the model has {len(model.names)} "
            "classes of its own that do not map onto it"
        )
    by_name = {_normalise(n): i for i, n in enumerate(model.names)}
    targets = [by_name.get(_normalise(c)) for c in dataset_classes]
    missing = [c for c, t in zip(dataset_classes, targets) if t is None]
    if missing:
        return None, (
            f"{len(missing)} of the dataset's {len(dataset_classes)} classes "
            f"(e.g. {missing[0]!r}) are not among the model's class names"
        )
    return targets, None
