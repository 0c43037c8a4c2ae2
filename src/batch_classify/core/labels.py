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


INDEX = re.compile(r"^[+-]?\d{1,9}$")


def parse_imagenet_label(value: str, where: str) -> int:
    """An ImageNet-1k label given as an index (0-999) or a wnid; ValueError names `where`.

    The error quotes the label only where it has the shape of one (a wnid, a short integer):
    anything else is described by its length, so a label cell or member never copies
    arbitrary text into the rows and the log."""
    value = value.strip()
    if WNID.match(value):
        index = wnid_to_index().get(value)
        if index is None:
            raise ValueError(f"{where}: {value} is not one of the 1000 ImageNet-1k wnids")
        return index
    if not INDEX.match(value):
        shape = "empty" if not value else f"{len(value)} characters"
        raise ValueError(
            f"{where}: the label ({shape}) is neither an ImageNet-1k index (0-999) nor a wnid"
        )
    index = int(value)
    if not 0 <= index < 1000:
        raise ValueError(f"{where}: label index {index} is outside ImageNet-1k's 0-999")
    return index


@dataclass(frozen=True)
class ModelLabels:
    """How a model's logits become reported classes."""

    keep: tuple[int, ...]
    """Logits that take part in softmax and top-k, in order."""
    ids: tuple[int, ...]
    """Reported class id of each kept logit (an ImageNet-1k index where ``imagenet``)."""
    names: tuple[str, ...]
    """Name of each kept logit's class."""
    imagenet: bool
    """Whether ``ids`` are ImageNet-1k indices."""
    note: str

    def restrict(self, subset: tuple[int, ...], name: str) -> ModelLabels:
        """Score only the classes in ``subset`` (ImageNet-1k indices), as timm's --valid-labels."""
        if not self.imagenet:
            raise ValueError(f"data.class_subset {name!r} needs a model with ImageNet-1k outputs")
        wanted = set(subset)
        chosen = [i for i, class_id in enumerate(self.ids) if class_id in wanted]
        if len(chosen) != len(wanted):
            raise ValueError(f"data.class_subset {name!r}: the model lacks some of its classes")
        return ModelLabels(
            tuple(self.keep[i] for i in chosen), tuple(self.ids[i] for i in chosen),
            tuple(self.names[i] for i in chosen), True,
            f"{self.note}; scored on the {len(chosen)} classes of {name} only",
        )


@lru_cache(maxsize=1)
def _imagenet_name_index() -> dict[str, int]:
    """Every unambiguous way of naming an ImageNet-1k class: wnid, full name, each synonym."""
    index: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, (wnid, name) in enumerate(zip(*imagenet_classes())):
        for key in {wnid, _normalise(name), *(_normalise(part) for part in name.split(","))}:
            if key in index and index[key] != i:
                ambiguous.add(key)
            index.setdefault(key, i)
    return {key: i for key, i in index.items() if key not in ambiguous}


def _imagenet_ids_by_name(names: tuple[str, ...]) -> tuple[int, ...] | None:
    lookup = _imagenet_name_index()
    ids = [lookup.get(_normalise(name), lookup.get(name.strip())) for name in names]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        return None
    return tuple(ids)


def model_labels(id2label: dict[int, str], num_labels: int) -> ModelLabels:
    """Work out a classifier's label space from its config."""
    names = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels))
    every = tuple(range(num_labels))
    if num_labels == 1001 and "background" in names[0].lower():
        return ModelLabels(every[1:], tuple(range(1000)), names[1:], True,
                           "1001 outputs with 'background' first: logit 0 dropped, rest shifted")
    by_name = _imagenet_ids_by_name(names)
    if by_name is not None and by_name != every:
        return ModelLabels(every, by_name, names, True,
                           f"{num_labels} outputs mapped onto ImageNet-1k by class name")
    if num_labels == 1000:
        return ModelLabels(every, every, names, True, "1000 outputs: ImageNet-1k order")
    return ModelLabels(every, every, names, False, f"{num_labels} outputs: the model's own classes")


def class_subset(value: str) -> tuple[int, ...]:
    """ImageNet-1k indices of ``data.class_subset``: 'imagenet-a', 'imagenet-r' (the 200-class
    test sets, from timm's tables) or a file of wnids or indices, one per line."""
    if value in {"imagenet-a", "imagenet-r"}:
        text = resources.files("timm.data").joinpath(
            "_info", f"imagenet_{value[-1]}_synsets.txt").read_text()
    else:
        try:
            with open(value) as handle:
                text = handle.read()
        except OSError as error:
            raise ValueError(f"data.class_subset {value!r}: not 'imagenet-a', 'imagenet-r' or a "
                             f"readable file ({error.strerror})") from None
    entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    subset = tuple(sorted({parse_imagenet_label(e, f"data.class_subset {value!r}") for e in entries}))
    if not subset:
        raise ValueError(f"data.class_subset {value!r} names no classes")
    return subset


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def label_targets(
    dataset_classes: tuple[str, ...] | None, model: ModelLabels
) -> tuple[list[int] | None, str | None]:
    """Map dataset label indices onto model output indices.

    ``dataset_classes`` None means the dataset's labels are ImageNet-1k indices.
    Returns (target of each dataset label, None if the model cannot predict it, None) or
    (None, why accuracy is unavailable).
    """
    if dataset_classes is None:
        if model.imagenet:
            scored = set(model.ids)
            return [i if i in scored else None for i in range(1000)], None
        return None, (
            f"the dataset is labelled in ImageNet-1k but the model has {len(model.names)} "
            "classes of its own that do not map onto it"
        )
    by_name = {_normalise(n): class_id for class_id, n in zip(model.ids, model.names)}
    targets = [by_name.get(_normalise(c)) for c in dataset_classes]
    missing = [c for c, t in zip(dataset_classes, targets) if t is None]
    if missing:
        return None, (
            f"{len(missing)} of the dataset's {len(dataset_classes)} classes "
            f"(e.g. {missing[0]!r}) are not among the model's class names"
        )
    return targets, None
