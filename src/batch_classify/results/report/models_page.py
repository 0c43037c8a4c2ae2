"""report.html at the top of a several-model output: the models side by side, and the images they
disagree on most confidently, each with every model's prediction.

The model folders of one pass hold the same units; each unit is read from every folder at once
(one unit of each in memory), rows matched on id, and the disagreements ranked as they stream
(a bounded number kept, ties to the lower unit and row). Their pictures are read back unit by
unit from the first model's listing (every model folder of a pass lists the same input).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.layout import REPORT_ASSETS, REPORT_HTML
from batch_classify.core.text import percent
from batch_classify.output.manifest import read_manifest
from batch_classify.output.units import unit_files
from batch_classify.results.report.html import document, esc, html_table
from batch_classify.results.report.names import ClassNames, class_names
from batch_classify.results.report.scan import SCAN_COLUMNS, Batch
from batch_classify.results.report.thumbnails import Pictures

DISAGREEMENTS = 24


@dataclass
class Disagreement:
    unit: int
    item_id: str
    label: int
    predictions: list[tuple[int, float]]
    """(top-1, confidence) of each model, in the models' order."""


@dataclass
class Tally:
    n_all_decoded: int = 0
    n_disagree: int = 0


def _unit_batches(paths: list[Path]) -> list[Batch] | None:
    """One unit of every model as a Batch each, rows in the first model's order (None where the
    folders do not hold the same ids)."""
    tables = [pq.read_table(path, columns=SCAN_COLUMNS) for path in paths]
    first = tables[0]
    aligned = [first]
    for table in tables[1:]:
        if table.num_rows != first.num_rows:
            return None
        if not table.column("id").equals(first.column("id")):
            order = {item_id: i for i, item_id in enumerate(table.column("id").to_pylist())}
            try:
                table = table.take(pa.array([order[i] for i in first.column("id").to_pylist()]))
            except KeyError:
                return None
        aligned.append(table)
    return [Batch.read(table.combine_chunks().to_batches()[0]) if table.num_rows else None
            for table in aligned]


def disagreements(folders: list[Path]) -> tuple[list[Disagreement], Tally, list[dict[int, str]]]:
    """The most confident disagreements (by the highest top-1 confidence among the models), the
    counts, and each model's class names as its rows gave them."""
    files = [dict(unit_files(folder)) for folder in folders]
    common = sorted(set.intersection(*(set(f) for f in files)))
    kept: list[tuple[float, int, int, Disagreement]] = []
    tally = Tally()
    names: list[dict[int, str]] = [{} for _ in folders]
    for unit in common:
        batches = _unit_batches([f[unit] for f in files])
        if batches is None or batches[0] is None:
            continue
        for model, batch in enumerate(batches):
            names[model].update({k: v for k, v in batch.model_names.items() if v})
        decoded = np.logical_and.reduce([b.ok for b in batches])
        top1 = np.stack([b.top1 for b in batches])
        differ = decoded & (top1 != top1[0]).any(axis=0)
        tally.n_all_decoded += int(decoded.sum())
        tally.n_disagree += int(differ.sum())
        rows = np.flatnonzero(differ)
        if rows.size == 0:
            continue
        confidence = np.stack([b.confidence for b in batches])
        key = -confidence[:, rows].max(axis=0)
        best = rows[np.argsort(key, kind="stable")[:DISAGREEMENTS]]
        ids = batches[0].ids.take(pa.array(best)).to_pylist()
        for row, item_id in zip(best.tolist(), ids):
            entry = Disagreement(unit, item_id, int(batches[0].label[row]),
                                 [(int(top1[m, row]), float(confidence[m, row]))
                                  for m in range(len(batches))])
            kept.append((-float(confidence[:, row].max()), unit, row, entry))
        kept = heapq.nsmallest(DISAGREEMENTS, kept, key=lambda x: x[:3])
    return [entry[-1] for entry in kept], tally, names


def _figure(example: Disagreement, models: list[str], names: list[ClassNames], pictures: Pictures) -> str:
    label = names[0].label(example.label, short=True) if example.label >= 0 else None
    said = [(model, names[m].predicted(top1, short=True), score)
            for m, (model, (top1, score)) in enumerate(zip(models, example.predictions))]
    alt = f"id {example.item_id}" + (f", label {label}" if label is not None else "") + "".join(
        f", {model} predicted {name} ({score:.0%})" for model, name, score in said)
    src = pictures.src(example.unit, example.item_id)
    picture = (f'<img src="{esc(src)}" alt="{esc(alt)}" loading="lazy">' if src is not None else
               f'<div class="missing" title="{esc(pictures.why_missing(example.unit, example.item_id))}">'
               "image unavailable</div>")
    lines = [f'<span class="id" title="{esc(example.item_id)}"><bdi>{esc(example.item_id)}</bdi></span>']
    if label is not None:
        lines.append(f'<span class="truth" data-label="{esc(label)}">true: {esc(label)}</span>')
    lines += [f'<span class="pred" data-model="{esc(model)}" data-predicted="{esc(name)}">'
              f"{esc(model)}: {score:.0%} {esc(name)}</span>" for model, name, score in said]
    return (f'<figure class="wide"><div class="box">{picture}</div>'
            f'<figcaption>{"".join(lines)}</figcaption></figure>')


def write_models_page(output: Path, folders: list[Path], summary: dict[str, Any]) -> int:
    """Write ``output``/report.html for the models in ``folders`` (side_by_side's ``summary``);
    return the bytes of the page and its thumbnails."""
    models = [folder.name for folder in folders]
    found, tally, seen = disagreements(folders)
    manifests = [read_manifest(folder) for folder in folders]
    names = [class_names(manifest, model_names) for manifest, model_names in zip(manifests, seen)]
    pictures = Pictures.read(manifests[0], folders[0], [(e.unit, e.item_id) for e in found], [],
                             output / REPORT_ASSETS)
    rows = []
    for m in summary["models"]:
        ece = m.get("ece")
        rate = m.get("images_per_second")
        cells = ((m["top1"], percent(m["top1"])), (m["top5"], percent(m["top5"])),
                 (ece, "n/a" if ece is None else f"{ece:.4f}"),
                 (rate, "n/a" if rate is None else f"{rate:.1f}"))
        rows.append(f'<tr><td><a href="{quote(m["folder"])}/{REPORT_HTML}">{esc(m["folder"])}</a></td>'
                    f"<td>{esc(m['model'])}</td>"
                    + "".join(f'<td class="num" data-value="{"" if v is None else v}">{esc(text)}</td>'
                              for v, text in cells) + "</tr>")
    table = html_table([("folder", "text"), ("model", "text"), ("top-1", "number"), ("top-5", "number"),
                    ("ECE", "number"), ("images/s (pass)", "number")], rows, "models-table", True)
    agreement = {(p["a"], p["b"]): p["agreement"] for p in summary["agreement"]}
    matrix = [f"<tr><th>{esc(a)}</th>" + "".join(
        f"<td>{'-' if a == b else esc(percent(agreement.get((a, b), agreement.get((b, a)))))}</td>"
        for b in models) + "</tr>" for a in models]
    head = "".join(f"<th>{esc(b)}</th>" for b in models)
    body = [f'<h2 id="models">Models</h2>{table}<p class="note">Each model\'s own page: follow its '
            "folder.</p>",
            f'<h2 id="agreement">Top-1 agreement</h2><table><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{''.join(matrix)}</tbody></table>",
            f'<h2 id="disagreements">Where they disagree</h2><p>{tally.n_disagree} of {tally.n_all_decoded} '
            "images that every model decoded get different top-1 classes; the most confident "
            f"disagreements first (by the highest confidence among the models).{_note(pictures)}</p>",
            '<div class="grid disagreements">' + "".join(_figure(e, models, names, pictures) for e in found)
            + "</div>"]
    nav = [("models", "Models"), ("agreement", "Agreement"), ("disagreements", "Disagreements")]
    text = document(f"{len(models)} models, one pass", "", nav, "".join(body))
    path = output / REPORT_HTML
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return len(text.encode()) + pictures.size_bytes()


def _note(pictures: Pictures) -> str:
    if pictures.reading.unreachable:
        return f" The images could not be opened: {esc(pictures.reading.unreachable)}."
    return ""

