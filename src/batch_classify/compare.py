"""Compare two output folders (two models, or two runs) item by item, joined on id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import aggregate as _aggregate
from .labels import imagenet_classes
from .manifest import MANIFEST, read_manifest
from .report import model_is_imagenet, shorten
from .writer import PREDICTIONS_DIR

TOP_CLASSES = 10


class CompareError(RuntimeError):
    """A folder cannot be compared; the message says which and why."""


def _side(output_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(manifest, rows by id) of one output folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder")
    missing = [name for name in (MANIFEST, PREDICTIONS_DIR + "/") if not (folder / name).exists()]
    if missing:
        raise CompareError(f"{folder} is not a batch-classify output folder "
                           f"(no {' or '.join(missing)} in it)")
    manifest = read_manifest(folder)
    table = _aggregate.read_predictions(folder)
    rows = {}
    for row in table.select(["id", "target", "topk_ids", "topk_labels", "error"]).to_pylist():
        decoded = row["error"] is None and bool(row["topk_ids"])
        rows[row["id"]] = {"target": row["target"], "decoded": decoded,
                           "top1": row["topk_ids"][0] if decoded else None,
                           "top1_name": row["topk_labels"][0] if decoded and row["topk_labels"] else None}
    return manifest, rows


def _class_namer(manifest: dict[str, Any], *sides: dict[str, dict[str, Any]]):
    """Name of a model-space class index: ImageNet's name where the model reports ImageNet-1k,
    else the name the models gave it in their predictions."""
    imagenet = model_is_imagenet(manifest.get("model", {}))
    seen = {row["top1"]: row["top1_name"] for side in reversed(sides) for row in side.values()
            if row["top1"] is not None and row["top1_name"]}

    def name(index: int) -> str:
        if imagenet and 0 <= index < 1000:
            return shorten(imagenet_classes()[1][index])
        return seen.get(index, f"class {index}")

    return name


def compare(dir_a: str | Path, dir_b: str | Path) -> dict[str, Any]:
    """Join two outputs on id: top-1 agreement, ids on one side only, per-class disagreement
    (by target where labelled, else by A's top-1) and, where labelled, each side's top-1 on the
    rows both scored."""
    manifest_a, a = _side(dir_a)
    manifest_b, b = _side(dir_b)
    common = [item for item in a if item in b]
    both = [item for item in common if a[item]["decoded"] and b[item]["decoded"]]
    same = np.array([a[item]["top1"] == b[item]["top1"] for item in both], dtype=bool)
    labelled = [item for item in both if a[item]["target"] is not None and b[item]["target"] is not None]
    keys = np.array([a[item]["target"] if a[item]["target"] is not None else a[item]["top1"]
                     for item in both], dtype=np.int64)
    name = _class_namer(manifest_a, a, b)
    result: dict[str, Any] = {
        "a": {"dir": str(dir_a), "model": manifest_a.get("model", {}).get("name"), "n": len(a)},
        "b": {"dir": str(dir_b), "model": manifest_b.get("model", {}).get("name"), "n": len(b)},
        "same_dataset": manifest_a["dataset"].get("fingerprint") == manifest_b["dataset"].get("fingerprint"),
        "n_common": len(common),
        "n_only_a": len(a) - len(common),
        "n_only_b": len(b) - len(common),
        "n_both_decoded": len(both),
        "n_agree": int(same.sum()),
        "agreement": float(same.mean()) if both else None,
        "classes_by": _keyed_by(sum(a[item]["target"] is not None for item in both), len(both)),
        "classes": _class_disagreement(keys, same, name),
        "labelled": _labelled(labelled, a, b),
    }
    return result


def _keyed_by(n_targets: int, n: int) -> str:
    if n_targets == n:
        return "target"
    return "top-1 of A" if n_targets == 0 else "target, else top-1 of A"


def _class_disagreement(keys: np.ndarray, same: np.ndarray, name) -> list[dict[str, Any]]:
    """Classes by number of disagreeing rows, then by rate; only those with any."""
    classes = []
    for key in np.unique(keys[keys >= 0]):
        mask = keys == key
        differ = int((~same[mask]).sum())
        if differ:
            classes.append({"class_index": int(key), "name": name(int(key)), "n": int(mask.sum()),
                            "n_differ": differ, "rate": differ / int(mask.sum())})
    classes.sort(key=lambda c: (-c["n_differ"], -c["rate"], c["class_index"]))
    return classes[:TOP_CLASSES]


def _labelled(items: list[str], a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]
              ) -> dict[str, Any] | None:
    """Each side's top-1 on the rows both scored, and where exactly one of them is right."""
    if not items:
        return None
    right_a = np.array([a[i]["top1"] == a[i]["target"] for i in items], dtype=bool)
    right_b = np.array([b[i]["top1"] == b[i]["target"] for i in items], dtype=bool)
    return {"n": len(items), "top1_a": float(right_a.mean()), "top1_b": float(right_b.mean()),
            "only_a_right": int((right_a & ~right_b).sum()), "only_b_right": int((right_b & ~right_a).sum())}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as text for a terminal."""
    a, b = result["a"], result["b"]
    lines = [f"A  {a['dir']}  model {a['model']}  ({a['n']} rows)",
             f"B  {b['dir']}  model {b['model']}  ({b['n']} rows)"]
    if not result["same_dataset"]:
        lines.append("note: the manifests name different datasets (fingerprints differ)")
    lines += [
        f"ids in both       {result['n_common']}  (only in A: {result['n_only_a']}, "
        f"only in B: {result['n_only_b']})",
        f"both decoded      {result['n_both_decoded']}",
        f"top-1 agreement   {_percent(result['agreement'])}  "
        f"({result['n_agree']} of {result['n_both_decoded']})",
    ]
    labelled = result["labelled"]
    if labelled is not None:
        lines += [
            f"top-1 accuracy    A {_percent(labelled['top1_a'])}   B {_percent(labelled['top1_b'])}  "
            f"(on the {labelled['n']} rows both scored)",
            f"only one right    A {labelled['only_a_right']}   B {labelled['only_b_right']}",
        ]
    classes = result["classes"]
    if classes:
        width = max(len(c["name"]) for c in classes)
        lines += ["", f"classes where they differ most (by {result['classes_by']}):",
                  f"  {'class':<{width}}  {'n':>6}  {'differ':>6}  {'rate':>7}"]
        lines += [f"  {c['name']:<{width}}  {c['n']:>6}  {c['n_differ']:>6}  {_percent(c['rate']):>7}"
                  for c in classes]
    return "\n".join(lines)
