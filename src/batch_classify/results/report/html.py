"""report.html: the report as one static page with its thumbnails beside it (report_files/).

It opens from ``file://`` with no server and no network: no external address anywhere, the
style and a small script (sorting and filtering the class table) inline. Every text that
comes from the data (ids, class names, error messages) is HTML-escaped; thumbnails are named
by a digest, never by an id. Each class has a section of its own (``#c-<index>``), shown when
its link is followed; its images load only then.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batch_classify.core.layout import PER_CLASS, PER_CLASS_PLOT, REPORT_HTML
from batch_classify.core.text import percent
from batch_classify.results.report.examples import Example
from batch_classify.results.report.names import ClassNames
from batch_classify.results.report.scan import ECE_BINS, ClassScore, Scan, confusions, per_class
from batch_classify.results.report.thumbnails import Pictures

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;color:#222}
h1{margin:16px 0 4px}h2{margin-top:28px;border-bottom:1px solid #ddd}
nav a{margin-right:14px}code{background:#f3f3f3;padding:0 3px}
table{border-collapse:collapse;margin:8px 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.num,th.num{text-align:right}
table.sortable th{cursor:pointer;user-select:none;background:#f6f6f6}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:136px;font-size:12px}figure.wide{width:210px}
figure .box{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}
figure img{max-width:128px;max-height:128px;image-rendering:auto}
figure .missing{color:#777;font-size:11px;padding:4px}
figcaption span{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.id{color:#666;direction:rtl;text-align:left}.truth{color:#1b7a1b}.wrong{color:#b22222}.pred{color:#333}
.class-page{display:none;border:1px solid #ccc;border-radius:6px;padding:4px 16px 16px;margin:16px 0}
.class-page:target{display:block}
#filter{padding:4px 8px;width:280px}
.note{color:#666}
.pairs{display:flex;flex-wrap:wrap;gap:4px 24px}.pair h3{font-size:13px;margin:10px 0 4px;max-width:280px}
"""

SCRIPT = """
(function () {
  function value(row, column) {
    var cell = row.cells[column];
    return cell.hasAttribute('data-value') ? cell.getAttribute('data-value') : cell.textContent;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (head, column) {
      head.addEventListener('click', function () {
        var ascending = head.getAttribute('aria-sort') !== 'ascending';
        var numeric = head.getAttribute('data-type') === 'number';
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a, column), y = value(b, column), order;
          if (numeric) {
            x = x === '' ? -Infinity : parseFloat(x);
            y = y === '' ? -Infinity : parseFloat(y);
            order = x < y ? -1 : x > y ? 1 : 0;
          } else {
            order = x.localeCompare(y);
          }
          return ascending ? order : -order;
        });
        Array.prototype.forEach.call(heads, function (other) { other.removeAttribute('aria-sort'); });
        head.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  var filter = document.getElementById('filter');
  if (filter) {
    filter.addEventListener('input', function () {
      var query = filter.value.trim().toLowerCase();
      var rows = document.querySelectorAll('#class-table tbody tr');
      Array.prototype.forEach.call(rows, function (row) {
        row.hidden = query !== '' && row.getAttribute('data-name').indexOf(query) < 0;
      });
    });
  }
})();
"""


FILTER = ('<p><input id="filter" type="search" placeholder="filter by name" '
          'aria-label="filter classes by name">')


def esc(value: Any) -> str:
    """Text or an attribute value, escaped for HTML (quotes included)."""
    return html.escape(str(value), quote=True)


def html_table(headers: list[tuple[str, str]], rows: Iterable[str], table_id: str = "",
           sortable: bool = False) -> str:
    """headers: (text, "number" or "text"); rows: ready <tr> strings."""
    attributes = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f'<th data-type="{kind}"{" class=num" if kind == "number" else ""}>{esc(text)}</th>'
                   for text, kind in headers)
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(text: Any, value: Any = None) -> str:
    """A cell; ``value`` (a number) is what it sorts by."""
    if value is None:
        return f"<td>{esc(text)}</td>"
    shown = "" if isinstance(value, float) and value != value else value
    return f'<td class="num" data-value="{esc(shown)}">{esc(text)}</td>'


@dataclass
class Page:
    """What the page is made of: the report's scan, names, metrics and pictures."""

    output: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    scan: Scan
    names: ClassNames
    pictures: Pictures

    @property
    def model_name(self) -> str:
        return str(self.manifest.get("model", {}).get("name"))


# ---------------------------------------------------------------- pieces


LABELLED_KINDS = {"misses", "hits", "unsure-hits", "pair"}
WRONG_KINDS = {"misses", "pair"}


def figure(page: Page, example: Example, kind: str) -> str:
    """One example: its thumbnail (or why there is none), id, label and prediction."""
    labelled = kind in LABELLED_KINDS
    names = page.names
    predicted = names.predicted(example.top1, short=True)
    score = f"{example.confidence:.0%}"
    label = names.label(example.label, short=True) if labelled and example.label >= 0 else None
    alt = f"id {example.item_id}" + (f", label {label}" if label is not None else "") + \
        f", predicted {predicted} ({score})"
    src = page.pictures.src(example.unit, example.item_id)
    if src is None:
        why = page.pictures.why_missing(example.unit, example.item_id)
        picture = f'<div class="missing" title="{esc(why)}">image unavailable</div>'
    else:
        picture = f'<img src="{esc(src)}" alt="{esc(alt)}" loading="lazy">'
    # Cut at the start (the end of an id is its file name); <bdi> keeps its characters in order.
    caption = [f'<span class="id" title="{esc(example.item_id)}"><bdi>{esc(example.item_id)}</bdi></span>']
    if label is not None:
        caption.append(f'<span class="truth" data-label="{esc(label)}">true: {esc(label)}</span>')
    css = "wrong" if kind in WRONG_KINDS else "pred"
    caption.append(f'<span class="{css}" data-predicted="{esc(predicted)}" '
                   f'data-score="{example.confidence:.4f}">{esc(score)} {esc(predicted)}</span>')
    return f'<figure><div class="box">{picture}</div><figcaption>{"".join(caption)}</figcaption></figure>'


def gallery(page: Page, title: str, examples: list[Example], kind: str) -> str:
    """A titled row of examples; ``kind`` (misses, hits, unsure-hits, pair, sure, unsure) is also
    its CSS class."""
    if not examples:
        return f'<h3>{esc(title)}</h3><p class="note">None.</p>'
    return (f'<h3>{esc(title)}</h3><div class="grid {kind}">'
            + "".join(figure(page, e, kind) for e in examples) + "</div>")


def _summary(page: Page, extra: list[tuple[str, str]]) -> str:
    m = page.metrics
    errors = str(m["n_errors"])
    rows = [("images", m["n"]), ("errors", errors), ("labelled", m["n_labelled"]), ("scored", m["n_scored"])]
    if m.get("images_per_second") is not None:
        rows.append(("images/s", f"{m['images_per_second']:.1f}"))
    label_space = page.manifest.get("model", {}).get("label_space")
    if label_space:
        rows.append(("label space", label_space))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in [*rows, *extra])
    return f'<h2 id="summary">Summary</h2><table>{body}</table>'


def reliability_svg(scan: Scan) -> str:
    """The reliability diagram as inline SVG: accuracy per confidence bin against the diagonal."""
    count, accuracy, confidence = scan.calibration.reliability()
    size, pad = 300, 36
    scale = size - 2 * pad
    bins = len(count)
    parts = [f'<svg width="{size}" height="{size}" role="img" '
             f'aria-label="reliability diagram">',
             f'<rect x="{pad}" y="{pad}" width="{scale}" height="{scale}" fill="#fafafa" stroke="#999"/>']
    for i in range(bins):
        if count[i] == 0:
            continue
        x = pad + scale * i / bins
        height = scale * float(accuracy[i])
        gap = scale * float(confidence[i] - accuracy[i])
        parts.append(f'<rect x="{x:.1f}" y="{pad + scale - height:.1f}" width="{scale / bins:.1f}" '
                     f'height="{height:.1f}" fill="#55A868" stroke="#fff"><title>confidence '
                     f'{i / bins:.2f}-{(i + 1) / bins:.2f}: {int(count[i])} rows, '
                     f'accuracy {accuracy[i]:.1%}, '
                     f'mean confidence {confidence[i]:.1%}</title></rect>')
        if gap > 0:
            parts.append(f'<rect x="{x:.1f}" y="{pad + scale - height - gap:.1f}" width="{scale / bins:.1f}" '
                         f'height="{gap:.1f}" fill="none" stroke="#C44E52"/>')
    parts.append(f'<line x1="{pad}" y1="{pad + scale}" x2="{pad + scale}" y2="{pad}" stroke="#777" '
                 'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle" font-size="12">'
                 "top-1 confidence</text>")
    parts.append(f'<text x="12" y="{size / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 12 {size / 2})">accuracy</text>')
    parts.append("</svg>")
    return "".join(parts)


def _errors(page: Page) -> str:
    by_type = page.metrics.get("errors_by_type") or {}
    if not by_type:
        return '<h2 id="errors">Errors</h2><p class="note">None: every image decoded.</p>'
    examples = page.scan.examples.errors
    rows = []
    for kind, n in sorted(by_type.items(), key=lambda x: (-x[1], x[0])):
        shown = "".join(f"<li><code>{esc(e.item_id)}</code> {esc(e.message)}</li>"
                        for e in examples.get(kind, []))
        rows.append(f"<tr><td>{esc(kind)}</td>{_cell(n, n)}<td><ul>{shown}</ul></td></tr>")
    return '<h2 id="errors">Errors by type</h2>' + html_table([("type", "text"), ("rows", "number"),
                                                           ("examples (id, message)", "text")], rows)


def _class_link(index: int, name: str) -> str:
    return f'<a href="#c-{index}">{esc(name)}</a>'


def _others(examples: list[Example], shown: list[Example] | None) -> list[Example]:
    """``examples`` less those already ``shown`` (a class with few rows has them in both lists)."""
    seen = {(e.unit, e.item_id) for e in shown or []}
    return [e for e in examples if (e.unit, e.item_id) not in seen]


# ---------------------------------------------------------------- labelled


def most_wrong(scan: Scan) -> dict[int, tuple[int, int]]:
    """True class -> (its commonest wrong top-1, how often)."""
    result: dict[int, tuple[int, int]] = {}
    for (true, predicted), n in scan.confused.items():
        best = result.get(true)
        if best is None or (n, -predicted) > (best[1], -best[0]):
            result[true] = (predicted, n)
    return result


def labelled_body(page: Page, scores: list[ClassScore], pairs: list[tuple[int, int, int]],
                  summary: list[tuple[str, str]]) -> str:
    names, examples = page.names, page.scan.examples
    wrong = most_wrong(page.scan)
    rows = []
    for s in scores:
        label = names.label(s.index, short=True)
        commonest = wrong.get(s.index)
        commonest_text = ("" if commonest is None else
                          f"{names.predicted(commonest[0], short=True)} ({commonest[1]})")
        rows.append(f'<tr data-name="{esc(names.label(s.index).lower())}" data-index="{s.index}">'
                    f"<td>{_class_link(s.index, label)}</td>{_cell(s.wnid)}{_cell(s.n, s.n)}"
                    f"{_cell(percent(s.top1), s.top1)}"
                    f"{_cell(percent(s.top5), float('nan') if s.top5 is None else s.top5)}"
                    f"<td>{esc(commonest_text)}</td></tr>")
    table = html_table([("class", "text"), ("wnid", "text"), ("n", "number"), ("top-1", "number"),
                    ("top-5", "number"), ("most frequent wrong prediction", "text")], rows,
                   "class-table", True)
    parts = [_summary(page, summary),
             f'<h2 id="classes">Classes ({len(scores)})</h2>' + FILTER +
             f' <span class="note">click a column to sort; a class to see its examples; all figures in '
             f'<a href="{PER_CLASS}">{PER_CLASS}</a>.</span></p>', table]
    pair_examples = examples.pair_examples()
    parts.append('<h2 id="pairs">Most-confused pairs</h2>')
    if not pairs:
        parts.append('<p class="note">No mistakes.</p>')
    blocks = []
    for true, predicted, n in pairs:
        title = f"{names.label(true, short=True)} taken for {names.predicted(predicted, short=True)}: {n}"
        shown = gallery(page, title, pair_examples.get((true, predicted), []), "pair")
        blocks.append(f'<div class="pair">{shown}</div>')
    parts.append(f'<div class="pairs">{"".join(blocks)}</div>')
    parts.append(f'<h2 id="calibration">Calibration</h2><p>Expected calibration error over {ECE_BINS} '
                 f'bins: {page.scan.calibration.ece():.4f}. Green: accuracy of the rows in each top-1 '
                 'confidence bin; red outline: the gap to their mean confidence; dashed: perfect '
                 f'calibration. Per-class plot: <a href="{PER_CLASS_PLOT}">{PER_CLASS_PLOT}</a>.</p>'
                 + reliability_svg(page.scan))
    parts.append(_errors(page))
    misses, sure, unsure = (examples.per_class(f) for f in (examples.misses, examples.sure_hits,
                                                            examples.unsure_hits))
    for s in scores:
        commonest = wrong.get(s.index)
        facts = f"{s.n} images, top-1 {percent(s.top1)}, top-5 {percent(s.top5)}" + (
            "" if commonest is None else
            f"; most often taken for {names.predicted(commonest[0], short=True)} ({commonest[1]})")
        parts.append(f'<section class="class-page" id="c-{s.index}"><h2>{esc(names.label(s.index))}'
                     f'{" <code>" + esc(s.wnid) + "</code>" if s.wnid else ""}</h2><p>{esc(facts)}. '
                     '<a href="#classes">back to the classes</a></p>'
                     + gallery(page, "Misses, most confident first", misses.get(s.index, []), "misses")
                     + gallery(page, "Hits, most confident", sure.get(s.index, []), "hits")
                     + gallery(page, "Hits, least confident",
                               _others(unsure.get(s.index, []), sure.get(s.index)), "unsure-hits")
                     + "</section>")
    return "".join(parts)


# ---------------------------------------------------------------- labelling mode


def labelling_body(page: Page, ordered: list[tuple[int, int]], summary: list[tuple[str, str]]) -> str:
    names, examples, total = page.names, page.scan.examples, page.scan.n_predicted
    rows = [f'<tr data-name="{esc(names.predicted(p).lower())}" data-index="{p}">'
            f"<td>{_class_link(p, names.predicted(p, short=True))}</td>{_cell(names.predicted_wnid(p))}"
            f"{_cell(n, n)}{_cell(percent(n / total), n / total)}</tr>" for p, n in ordered]
    table = html_table([("predicted class", "text"), ("wnid", "text"), ("images", "number"),
                        ("share", "number")],
                   rows, "class-table", True)
    parts = [_summary(page, summary),
             f'<h2 id="classes">Predicted classes ({len(ordered)})</h2>' + FILTER +
             ' <span class="note">no labels: what the model predicted. Click a class to see its most '
             'and least confident images.</span></p>', table, _errors(page)]
    sure, unsure = examples.per_class(examples.sure_predicted), examples.per_class(examples.unsure_predicted)
    for p, n in ordered:
        parts.append(f'<section class="class-page" id="c-{p}"><h2>{esc(names.predicted(p))}</h2>'
                     f'<p>{n} images predicted ({esc(percent(n / total))}). '
                     '<a href="#classes">back to the classes</a></p>'
                     + gallery(page, "Most confident", sure.get(p, []), "sure")
                     + gallery(page, "Least confident", _others(unsure.get(p, []), sure.get(p)), "unsure")
                     + "</section>")
    return "".join(parts)


# ---------------------------------------------------------------- the page


def document(title: str, header: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{anchor}">{esc(text)}</a>' for anchor, text in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1>{header}<nav>{links}</nav>{body}<script>{SCRIPT}</script></body></html>\n")


def write_page(page: Page, body: str, labelled: bool) -> int:
    """Write report.html; return the bytes of the page and its thumbnails."""
    dataset = page.manifest["dataset"]
    header = (f"<p>Model <code>{esc(page.model_name)}</code> on <code>{esc(dataset.get('path'))}</code> "
              f"({esc(dataset.get('kind'))}).{_reading_note(page.pictures)}</p>")
    nav = [("summary", "Summary"), ("classes", "Classes")]
    nav += [("pairs", "Confused pairs"), ("calibration", "Calibration")] if labelled else []
    nav.append(("errors", "Errors"))
    text = document("Classification report", header, nav, body)
    path = page.output / REPORT_HTML
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return len(text.encode()) + page.pictures.size_bytes()


def _reading_note(pictures: Pictures) -> str:
    if pictures.reading.unreachable:
        why = esc(pictures.reading.unreachable)
        return f' <span class="note">The images could not be opened: {why}.</span>'
    failed = len(pictures.reading.failed)
    return f' <span class="note">{failed} image(s) could not be opened.</span>' if failed else ""


def page_pictures(scan: Scan) -> list[tuple[int, str]]:
    """(unit, id) of every example the page shows with a picture."""
    examples = scan.examples
    families = ((examples.misses, examples.sure_hits, examples.unsure_hits, examples.pairs) if scan.n_scored
                else (examples.sure_predicted, examples.unsure_predicted))
    return [(e.unit, e.item_id) for family in families for rows in examples.per_class(family).values()
            for e in rows]


def write_html(page: Page) -> int:
    """Write report.html from the scan (labelled, or labelling mode as report.md decides); return
    the bytes of the page and its thumbnails."""
    scan, metrics = page.scan, page.metrics
    if scan.n_scored:
        scores = per_class(scan, page.names)
        macro = float(np.mean([s.top1 for s in scores]))
        summary = [("top-1", percent(metrics["top1"])), ("top-5", percent(metrics["top5"])),
                   (f"macro top-1 (mean over {len(scores)} classes)", percent(macro)),
                   (f"expected calibration error ({ECE_BINS} bins)", f"{scan.calibration.ece():.4f}")]
        return write_page(page, labelled_body(page, scores, confusions(scan), summary), True)
    ordered = sorted(scan.predicted.items(), key=lambda x: (-x[1], x[0]))
    why = metrics.get("accuracy_unavailable") or (
        "the dataset has no labels" if metrics["n_labelled"] == 0 else "no item could be scored")
    summary = [("accuracy", f"unavailable: {why}"), ("distinct top-1 classes", str(len(ordered)))]
    return write_page(page, labelling_body(page, ordered, summary), False)
