"""report.html: the examples chosen while streaming (against brute force), thumbnails read back unit by
unit, escaping of awkward ids and names, and the page in a real headless browser from file://."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import browser, console_errors, file_url, load_every_image
from test_report import make_output, solid_images
from test_streaming import all_rows, decoded, random_units, report_scored, write_output

from batch_classify.output import units
from batch_classify.results.aggregate import aggregate
from batch_classify.results.report import examples as examples_module
from batch_classify.results.report import write_report
from batch_classify.results.report.examples import HITS, MISSES, PREDICTED

# Class names and ids with characters that are special in HTML, URLs or both.
CLASSES = ['cat & "kitten"', "dög <b>bold</b>", "fox #1 'red' 100%"]
SCORED = [  # (id, label, top-1, confidence)
    ("cat/a<b>&amp;.png", 0, 1, 0.95),
    ("cat/#frag%20x.png", 0, 0, 0.90),
    ("cat/\"quoted\" 'single'.png", 0, 1, 0.60),
    ("cat/plain.png", 0, 0, 0.40),
    ("cat/ok.png", 0, 0, 0.30),
    ("dög/ünïcödé 猫.png", 1, 1, 0.80),
    ("dög/fine.png", 1, 1, 0.65),
    ("dög/100%.png", 1, 2, 0.70),
    ("fox/?q=1&x=2.png", 2, 2, 0.85),
    ("fox/space name.png", 2, 0, 0.55),
]
BROKEN = ("fox/broken<1>.png", "UnidentifiedImageError: cannot identify <x> & \"y\"")
MODEL = {"name": "tiny/<awkward>", "num_labels": 3, "label_space": "3 outputs: the model's own classes"}
COLOURS = {"a<b>&amp;": (220, 30, 30), "100%": (30, 30, 220)}


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    images = solid_images(tmp_path / "images", [row[0] for row in SCORED], COLOURS)
    rows = [{"id": i, "label": label, "top1": top1, "confidence": c} for i, label, top1, c in SCORED]
    rows.append({"id": BROKEN[0], "label": 2, "error": BROKEN[1]})
    out = make_output(tmp_path / "out", rows, classes=CLASSES, model=MODEL, model_names=CLASSES,
                      data={"path": str(images)}, kind="imagefolder", top_k=3)
    write_report(out)
    return out


PAGE_TAGS = ("html head meta title style body h1 h2 h3 p nav a code span table thead tbody tr th td input "
             "section div figure figcaption img ul li svg rect line text script bdi")


class Elements(HTMLParser):
    """Every start tag with its attributes (values unescaped, as a browser reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(path: Path) -> list[tuple[str, dict[str, str]]]:
    parser = Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tags


# ---------------------------------------------------------------- without a browser


def test_page_escapes_ids_and_names(awkward: Path):
    text = (awkward / "report.html").read_text(encoding="utf-8")
    tags = elements(awkward / "report.html")
    # No tag from the data: a class named "<b>bold</b>" or an id "a<b>" is text, not markup.
    assert {tag for tag, _ in tags} <= set(PAGE_TAGS.split())
    assert "<b>" not in text and "dög &lt;b&gt;bold&lt;/b&gt;" in text
    # Nothing from outside the folder: no address with a scheme, every image a digest-named file.
    assert not re.search(r"(https?:|//)[^ ]", re.sub(r"<script>.*</script>", "", text, flags=re.S))
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert images and all(re.fullmatch(r"report_files/[0-9a-f]{20}\.jpg", i["src"]) for i in images)
    assert all((awkward / i["src"]).is_file() for i in images)
    # Each alt names the id, the label and the prediction, exactly as they are.
    alts = {i["alt"] for i in images}
    assert "id cat/a<b>&amp;.png, label cat & \"kitten\", predicted dög <b>bold</b> (95%)" in alts
    assert "id dög/ünïcödé 猫.png, label dög <b>bold</b>, predicted dög <b>bold</b> (80%)" in alts
    for item_id, *_ in SCORED:
        assert any(alt.startswith(f"id {item_id},") for alt in alts), item_id
    # The error row is listed by type with its id and message, escaped.
    assert "fox/broken&lt;1&gt;.png" in text and "cannot identify &lt;x&gt; &amp; &quot;y&quot;" in text
    # Links to class sections use the class index, never the name.
    links = {attrs["href"] for tag, attrs in tags if tag == "a"}
    assert {"#c-0", "#c-1", "#c-2"} <= links


def test_thumbnails_are_small_and_stale_ones_go(awkward: Path):
    folder = awkward / "report_files"
    names = {p.name for p in folder.iterdir()}
    assert len(names) == len(SCORED)  # every scored row is shown somewhere, once
    stale = folder / ("0" * 20 + ".jpg")
    stale.write_bytes(b"old")
    keep = folder / "notes.txt"  # not ours: left alone
    keep.write_text("x")
    write_report(awkward)
    assert not stale.exists() and keep.exists()
    assert {p.name for p in folder.iterdir()} == names | {"notes.txt"}


def _brute_top(rows: list[dict], key, k: int, descending: bool) -> dict[int, list[tuple[int, str]]]:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    sign = -1 if descending else 1
    return {g: [(r["unit"], r["id"]) for r in sorted(rs, key=lambda r: (sign * r["topk_scores"][0], r["unit"],
                                                                           r["row"]))[:k]]
            for g, rs in groups.items()}


def _picked(family) -> dict[int, list[tuple[int, str]]]:
    kept = examples_module.examples_of(family.kept.rows)
    return {g: [(e.unit, e.item_id) for e in rows] for g, rows in kept.items()}


def test_examples_equal_brute_force(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(units, "BATCH_ROWS", 8)  # many record batches per unit
    from batch_classify.output.units import unit_files
    from batch_classify.results.report.scan import scan

    unit_rows = random_units(seed=5)
    rows = all_rows(unit_rows)
    out = write_output(tmp_path / "out", unit_rows)
    result = scan(unit_files(out)).examples
    scored = report_scored(rows)
    misses = [r for r in scored if r["topk_ids"][0] != r["target"]]
    hits = [r for r in scored if r["topk_ids"][0] == r["target"]]
    assert _picked(result.misses) == _brute_top(misses, lambda r: r["label"], MISSES, True)
    assert _picked(result.sure_hits) == _brute_top(hits, lambda r: r["label"], HITS, True)
    assert _picked(result.unsure_hits) == _brute_top(hits, lambda r: r["label"], HITS, False)
    # Each of the 20 commonest confused pairs has examples: its most confident misses.
    pairs = _brute_top(misses, lambda r: (r["label"], r["topk_ids"][0]), examples_module.PAIR_EXAMPLES, True)
    chosen = {pair: [(e.unit, e.item_id) for e in found] for pair, found in result.pair_examples().items()}
    from batch_classify.results.report.scan import confusions

    top = confusions(scan(unit_files(out)))
    assert all(chosen[(t, p)] == pairs[(t, p)] for t, p, _ in top)
    # Error examples: the first ids of each type, in unit then row order.
    errors = [r for r in rows if r["error"] is not None]
    for kind, found in result.errors.items():
        expected = [r["id"] for r in errors if r["error"].startswith(kind + ":")]
        assert [e.item_id for e in found] == expected[: examples_module.ERROR_EXAMPLES]


def test_labelling_mode_examples_equal_brute_force(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(units, "BATCH_ROWS", 8)
    from batch_classify.output.units import unit_files
    from batch_classify.results.report.scan import scan

    unit_rows = random_units(seed=8, labelled=False)
    result = scan(unit_files(write_output(tmp_path / "out", unit_rows))).examples
    ok = [r for r in all_rows(unit_rows) if decoded(r)]
    assert _picked(result.sure_predicted) == _brute_top(ok, lambda r: r["topk_ids"][0], PREDICTED, True)
    assert _picked(result.unsure_predicted) == _brute_top(ok, lambda r: r["topk_ids"][0], PREDICTED, False)


def test_examples_come_from_a_bounded_set_of_units(tmp_path: Path, monkeypatch):
    # 12 units; classes 0-2 in units 0-5 only, classes 3-5 first appear in unit 9.
    monkeypatch.setattr(examples_module, "EXAMPLE_ROWS", 20)
    from batch_classify.output.units import unit_files
    from batch_classify.results.report.scan import scan

    unit_rows = random_units(seed=6, sizes=[10] * 12)
    for unit, rows in enumerate(unit_rows):
        for row in rows:
            if row["label"] is not None:
                row["label"] = row["label"] % 3 if unit < 9 else 3 + row["label"] % 3
                row["target"] = row["label"] if row["target"] is not None else None
    out = write_output(tmp_path / "out", unit_rows)
    result = scan(unit_files(out)).examples
    # Units 0 and 1 make the first 20 rows; unit 9 brings new classes; nothing else is read.
    assert result.units_admitted == [0, 1, 9]
    shown = {(e.unit, e.item_id) for e in result.all_picked()}
    assert {unit for unit, _ in shown} <= {0, 1, 9}
    rows = [r for r in all_rows(unit_rows) if r["unit"] in {0, 1, 9}]
    misses = [r for r in report_scored(rows) if r["topk_ids"][0] != r["target"]]
    assert _picked(result.misses) == _brute_top(misses, lambda r: r["label"], MISSES, True)


def test_each_unit_is_read_back_once(tmp_path: Path, monkeypatch):
    """A listed folder of 4 units: the page's pictures and the contact sheet's come from one read of
    each unit (the listing's records), never one read per picture."""
    from batch_classify.core.config import DataConfig
    from batch_classify.inputs.listing import Listing, write_listing

    images = solid_images(tmp_path / "images", [row[0] for row in SCORED], COLOURS)
    rows = [{"id": i, "label": label, "top1": top1, "confidence": c} for i, label, top1, c in SCORED]
    out = make_output(tmp_path / "out", rows, classes=CLASSES, model=MODEL, model_names=CLASSES,
                      data={"path": str(images)}, kind="images", top_k=3)
    listing = write_listing(DataConfig(path=str(images), kind="images"), out, unit_size=3)
    assert listing.n_units == 4
    # Rewrite the unit files as the listing cut them: four units of up to 3 rows.
    import shutil

    shutil.rmtree(out / "predictions")
    by_id = {r["id"]: r for r in rows}
    from test_report import _prediction

    from batch_classify.output.writer import write_unit

    for unit in range(listing.n_units):
        ids = [record.id for record in listing.records(unit)]
        labels = [by_id[i]["label"] for i in ids]
        columns = {"id": ids, "label": labels, "target": labels,
                   "topk_ids": [], "topk_labels": [], "topk_scores": [], "error": [None] * len(ids)}
        for i in ids:
            top, scores = _prediction(by_id[i]["top1"], by_id[i]["confidence"], 3, 3)
            columns["topk_ids"].append(top)
            columns["topk_labels"].append([CLASSES[c] for c in top])
            columns["topk_scores"].append(scores)
        write_unit(out, unit, columns, {"model": MODEL})
    reads = []
    original = Listing.records

    def counted(self, unit, read_images=True):
        reads.append(unit)
        return original(self, unit, read_images)

    monkeypatch.setattr(Listing, "records", counted)
    extra = write_report(out)
    assert sorted(reads) == [0, 1, 2, 3]
    assert "mistakes.jpg" in extra["report_files"]
    assert len(list((out / "report_files").iterdir())) == len(SCORED)


def test_page_of_labelling_mode(tmp_path: Path):
    predictions = [(f"p{i}&<{i}>.png", i % 3, 0.3 + 0.05 * i) for i in range(12)]
    listed = tmp_path / "list" / "files.txt"
    solid_images(listed.parent, [p[0] for p in predictions], {})
    listed.write_text("\n".join(p[0] for p in predictions) + "\n")
    rows = [{"id": i, "label": None, "top1": top1, "confidence": c} for i, top1, c in predictions]
    out = make_output(tmp_path / "out", rows, classes="imagenet-1k", model=MODEL, model_names=CLASSES,
                      data={"path": str(listed)}, kind="file_list", top_k=3)
    write_report(out)
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "Predicted classes (3)" in text and "Most confident" in text and "Least confident" in text
    assert "unavailable: the dataset has no labels" in text
    alts = {attrs["alt"] for tag, attrs in elements(out / "report.html") if tag == "img"}
    assert "id p11&<11>.png, predicted fox #1 'red' 100% (85%)" in alts
    assert len(alts) == 12  # 4 per class: all of them most or least confident


def test_aggregate_logs_the_page_size(tmp_path: Path, caplog):
    out = write_output(tmp_path / "out", random_units(seed=7))
    with caplog.at_level("INFO", logger="batch_classify"):
        metrics = aggregate(out)
    assert metrics["report_page_bytes"] > 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("report.html" in message and "MB" in message for message in messages)


# ---------------------------------------------------------------- in a browser


def test_page_in_a_headless_browser(awkward: Path):
    page = awkward / "report.html"
    with browser() as driver:
        from selenium.webdriver.common.by import By

        driver.get(file_url(page))
        images = load_every_image(driver)
        assert images and all(image["width"] > 0 for image in images), images
        assert console_errors(driver) == []

        # Sorting by top-1 reorders the rows: ascending, then descending.
        def names() -> list[str]:
            return [row.get_attribute("data-index") for row in
                    driver.find_elements(By.CSS_SELECTOR, "#class-table tbody tr")]

        # By class index; top-1 is 3/5 (cat), 2/3 (dög), 1/2 (fox); n is 5, 3, 2.
        assert names() == ["0", "1", "2"]
        headers = driver.find_elements(By.CSS_SELECTOR, "#class-table thead th")
        top1 = next(h for h in headers if h.text.startswith("top-1"))
        top1.click()
        assert names() == ["2", "0", "1"] and top1.get_attribute("aria-sort") == "ascending"
        top1.click()
        assert names() == ["1", "0", "2"] and top1.get_attribute("aria-sort") == "descending"
        next(h for h in headers if h.text.startswith("n")).click()
        assert names() == ["2", "1", "0"]

        # Filtering by name hides the other rows.
        box = driver.find_element(By.ID, "filter")
        box.send_keys("dög")
        visible = [r.get_attribute("data-index") for r in
                   driver.find_elements(By.CSS_SELECTOR, "#class-table tbody tr") if r.is_displayed()]
        assert visible == ["1"]

        # A class's link opens its section: its misses, with their true and predicted labels.
        driver.get(file_url(page))  # afresh: every section hidden, the filter empty
        driver.find_element(By.CSS_SELECTOR, '#class-table a[href="#c-0"]').click()
        section = driver.find_element(By.ID, "c-0")
        assert section.is_displayed() and not driver.find_element(By.ID, "c-1").is_displayed()
        misses = section.find_elements(By.CSS_SELECTOR, ".misses figure")
        captions = [(f.find_element(By.CSS_SELECTOR, ".id").get_attribute("title"),
                     f.find_element(By.CSS_SELECTOR, ".truth").get_attribute("data-label"),
                     f.find_element(By.CSS_SELECTOR, ".wrong").get_attribute("data-predicted"))
                    for f in misses]
        assert captions == [("cat/a<b>&amp;.png", 'cat & "kitten"', "dög <b>bold</b>"),
                            ("cat/\"quoted\" 'single'.png", 'cat & "kitten"', "dög <b>bold</b>")]
        shown = [img for img in section.find_elements(By.TAG_NAME, "img")]
        assert all(driver.execute_script("return arguments[0].naturalWidth", img) > 0 for img in shown)
        assert console_errors(driver) == []


# ---------------------------------------------------------------- several models


def test_models_page_shows_the_disagreements(tmp_path: Path):
    from batch_classify.results.report.models_page import DISAGREEMENTS
    from batch_classify.results.side_by_side import side_by_side

    top = tmp_path / "out"
    runs = {name: random_units(seed=seed) for name, seed in (("alpha", 11), ("beta", 12))}
    for name, unit_rows in runs.items():
        aggregate(write_output(top / name, unit_rows))
    side_by_side(top, [top / "alpha", top / "beta"])
    a, b = (all_rows(runs[name]) for name in ("alpha", "beta"))
    differ = [(x, y) for x, y in zip(a, b)
              if decoded(x) and decoded(y) and x["topk_ids"][0] != y["topk_ids"][0]]
    text = (top / "report.html").read_text(encoding="utf-8")
    n_both = sum(decoded(x) and decoded(y) for x, y in zip(a, b))
    assert f"{len(differ)} of {n_both} images" in text
    ranked = sorted(differ, key=lambda p: (-max(p[0]["topk_scores"][0], p[1]["topk_scores"][0]), p[0]["unit"],
                                           p[0]["row"]))[:DISAGREEMENTS]
    shown = [attrs["title"] for tag, attrs in elements(top / "report.html")
             if tag == "span" and attrs.get("class") == "id"]
    assert shown == [x["id"] for x, _ in ranked]
    # Each model's row of the table links to its own page.
    links = {attrs["href"] for tag, attrs in elements(top / "report.html") if tag == "a"}
    assert {"alpha/report.html", "beta/report.html"} <= links


def test_pages_of_a_real_two_model_job_in_a_browser(tiny_models, corpus, tmp_path: Path):
    """The job writes report.html for each model and one for the pass; opened from file:// with the
    network off, each loads every image without a console error, and the models' page links to them."""
    import json

    from conftest import run_job

    out = tmp_path / "out"
    models = [str(tiny_models["mobilenet_v1"]), str(tiny_models["efficientnet"])]
    run_job(["--model.name", json.dumps(models), "--data.path", str(corpus), "--output.dir", str(out),
             "--runtime.batch_size", "4", "--output.unit_size", "4"])
    pages = [out / "report.html", out / "mobilenet_v1" / "report.html", out / "efficientnet" / "report.html"]
    assert all(page.is_file() for page in pages)
    with browser() as driver:
        from selenium.webdriver.common.by import By

        for page in pages:
            driver.get(file_url(page))
            images = load_every_image(driver)
            assert images and all(image["width"] > 0 for image in images), (page, images)
            assert console_errors(driver) == [], page
        driver.get(file_url(pages[0]))
        driver.find_element(By.CSS_SELECTOR, 'a[href="efficientnet/report.html"]').click()
        assert driver.current_url == file_url(pages[2])
        assert driver.find_element(By.ID, "class-table").is_displayed()
