"""Committed unit files count only once their footer shows them whole and this job's: damaged
or foreign files are found by the footer check, moved aside on resume and their units redone;
aggregate, verify and compare name them in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_corpus, read_rows, run_job

from batch_classify.commands.cli import main as cli_main
from batch_classify.core.config import parse_args
from batch_classify.core.layout import DAMAGED_DIR, unit_path
from batch_classify.core.text import write_json
from batch_classify.output import committed
from batch_classify.output.committed import Identity, check_committed, read_footer, rows_problem
from batch_classify.output.writer import read_unit_stats, write_unit
from batch_classify.results.aggregate import AggregateError, aggregate
from batch_classify.results.verify import verify
from batch_classify.run.job import current_metrics
from batch_classify.run.plan import plan

MODEL = {"name": "tiny/three", "num_labels": 3}
FINGERPRINT = "0123456789abcdef"
IDENTITY = Identity(FINGERPRINT, MODEL)


def unit_rows(unit: int, n: int = 10) -> dict[str, list]:
    return {"id": [f"u{unit}/img{i}.jpg" for i in range(n)], "label": [i % 3 for i in range(n)],
            "target": [i % 3 for i in range(n)], "topk_ids": [[i % 3, 0, 1, 2, 0][:3] for i in range(n)],
            "topk_labels": [["a", "b", "c"]] * n, "topk_scores": [[0.6, 0.3, 0.1]] * n,
            "error": [None] * (n - 1) + ["OSError: truncated"]}


def write_folder(folder: Path, n_units: int = 3, metadata: dict | None = None) -> Path:
    metadata = {"model": MODEL, "dataset_fingerprint": FINGERPRINT} if metadata is None else metadata
    for unit in range(n_units):
        write_unit(folder, unit, unit_rows(unit), metadata)
    write_json(folder / "manifest.json", {
        "dataset": {"path": "/data/x", "kind": "images", "n_items": 10 * n_units, "n_units": n_units,
                    "classes": ["a", "b", "c"], "fingerprint": FINGERPRINT},
        "model": MODEL, "job": {"top_k": 3, "unit_size": 10}, "config": {"data": {"path": "/data/x"}}})
    return folder


def rewrite_metadata(path: Path, **changes) -> None:
    """Rewrite a unit file with some footer metadata changed (JSON values; None removes a key)."""
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key.encode(), None)
        else:
            metadata[key.encode()] = value if isinstance(value, bytes) else json.dumps(value).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


def garble_page(path: Path, column: str = "topk_ids") -> None:
    """Overwrite the first page header of one column: the footer stays sound."""
    metadata = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(metadata.column(i) for i in range(metadata.num_columns)
                 if metadata.column(i).path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- the footer check, file by file


def damage_truncated(path, folder):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_empty(path, folder):
    path.write_bytes(b"")


def damage_random(path, folder):
    path.write_bytes(os.urandom(3000))


def damage_tiny(path, folder):
    path.write_bytes(b"PAR1")


def damage_other_schema(path, folder):
    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), path)


def damage_column_type(path, folder):
    table = pq.read_table(path)
    table = table.set_column(1, "label", pa.array([str(v) for v in table.column("label").to_pylist()]))
    pq.write_table(table, path)


def damage_no_counts(path, folder):
    rewrite_metadata(path, unit=None)


def damage_renamed(path, folder):
    shutil.copy(unit_path(folder, 2), path)


def damage_row_count(path, folder):
    rewrite_metadata(path, unit={**read_unit_stats(path), "n": 9})


def damage_counts_malformed(path, folder):
    rewrite_metadata(path, unit={**read_unit_stats(path), "n_errors": "one", "ids_digest": "xyz"})


def damage_json(path, folder):
    rewrite_metadata(path, unit=b"{not json")


def damage_other_dataset(path, folder):
    rewrite_metadata(path, dataset_fingerprint="fedcba9876543210")


def damage_other_model(path, folder):
    rewrite_metadata(path, model={**MODEL, "name": "tiny/other"})


def damage_no_identity(path, folder):
    rewrite_metadata(path, model=None, dataset_fingerprint=None)


DAMAGE = [
    (damage_truncated, "cut short: no PAR1 magic at its end"),
    (damage_empty, "the file is empty (0 bytes)"),
    (damage_random, "not a Parquet file (no PAR1 magic at its start)"),
    (damage_tiny, "not a Parquet file (4 bytes)"),
    (damage_other_schema, "not a predictions file: no column id, target, topk_ids"),
    (damage_column_type, "not a predictions file: column label is string, not int64"),
    (damage_no_counts, "its footer has no unit counts"),
    (damage_renamed, "its footer says it holds unit 2, its name says unit 1: a renamed or copied file"),
    (damage_row_count, "its footer counts 9 rows, the file holds 10"),
    (damage_counts_malformed, "its footer's unit counts are malformed (n_errors, ids_digest)"),
    (damage_json, "its footer's metadata is not valid JSON"),
    (damage_other_dataset, "written for another dataset (fingerprint fedcba9876543210, this folder's "
                           "0123456789abcdef): a file of another job"),
    (damage_other_model, "written by another model (tiny/other, this folder's tiny/three; name differ)"),
    (damage_no_identity, "its footer names no dataset fingerprint: not written by this job"),
]


@pytest.mark.parametrize(("damage", "problem"), DAMAGE, ids=[d.__name__[7:] for d, _ in DAMAGE])
def test_the_footer_check_names_what_is_wrong(tmp_path, damage, problem):
    folder = write_folder(tmp_path / "out")
    path = unit_path(folder, 1)
    assert read_footer(path, 1, IDENTITY).problem is None
    damage(path, folder)
    assert problem in read_footer(path, 1, IDENTITY).problem


def test_lenient_checks_pass_files_that_do_not_say(tmp_path):
    # aggregate and compare accept hand-made and older files: no counts, no dataset or model named
    folder = write_folder(tmp_path / "out", metadata={})
    path = unit_path(folder, 0)
    assert read_footer(path, 0, IDENTITY, strict=False).problem is None
    assert read_footer(path, 0, IDENTITY, strict=True).problem == (
        "its footer names no dataset fingerprint: not written by this job")
    rewrite_metadata(path, unit=None)
    assert read_footer(path, 0, IDENTITY, strict=False).problem is None
    assert read_footer(path, 0, IDENTITY, strict=True).problem == (
        "its footer has no unit counts: not written by the job")
    # ...but a file that names another dataset is another job's either way
    rewrite_metadata(unit_path(folder, 1), dataset_fingerprint="ff")
    assert "another dataset" in read_footer(unit_path(folder, 1), 1, IDENTITY, strict=False).problem


def test_a_damaged_page_behind_a_sound_footer_is_found_by_reading_the_rows(tmp_path):
    folder = write_folder(tmp_path / "out")
    path = unit_path(folder, 1)
    assert rows_problem(path) is None
    garble_page(path)
    assert read_footer(path, 1, IDENTITY).problem is None  # the footer check reads no rows
    assert rows_problem(path).startswith("its rows cannot be read (OSError: ")
    # a flipped byte inside the compressed page: only the page checksum the writer adds finds it
    write_unit(folder, 2, unit_rows(2, n=400), {"model": MODEL, "dataset_fingerprint": FINGERPRINT})
    path = unit_path(folder, 2)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    data[(chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 40] ^= 0x01
    path.write_bytes(bytes(data))
    assert "CRC checksum verification failed" in rows_problem(path)


@pytest.mark.parametrize("threads", [100, 2], ids=["in_turn", "thread_pool"])
def test_resume_moves_what_does_not_count_aside(tmp_path, caplog, monkeypatch, threads):
    monkeypatch.setattr(committed, "CHECK_THREADS", threads)
    monkeypatch.setattr(committed, "CHECK_WINDOW", 2)  # footers read in windows of 2
    folder = write_folder(tmp_path / "out", n_units=4)
    damage_truncated(unit_path(folder, 1), folder)
    damage_other_dataset(unit_path(folder, 3), folder)
    write_unit(folder, 7, unit_rows(7), {"model": MODEL, "dataset_fingerprint": FINGERPRINT})  # beyond 0-3
    truncated = unit_path(folder, 1).read_bytes()
    with caplog.at_level(logging.WARNING, logger="batch_classify"):
        checked = check_committed(folder, 4, IDENTITY)
    assert checked.units == {0, 2}
    assert sorted(p.name for p in (folder / "predictions").glob("*.parquet")) == [
        "unit-000000.parquet", "unit-000002.parquet"]
    moved = sorted((folder / "predictions" / DAMAGED_DIR).iterdir())
    assert [p.name.split(".parquet.")[0] for p in moved] == ["unit-000001", "unit-000003", "unit-000007"]
    assert moved[0].read_bytes() == truncated  # moved, never deleted or rewritten
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("predictions/unit-000001.parquet: cut short: no PAR1 magic at its end")
               and f"moved to predictions/{DAMAGED_DIR}/unit-000001.parquet." in w
               and w.endswith("unit 1 will be run again") for w in warnings), warnings
    assert any("unit-000007.parquet: this job has units 0 to 3 only" in w for w in warnings), warnings
    # the same unit damaged twice: both copies are kept
    damage_empty(unit_path(folder, 2), folder)
    check_committed(folder, 4, IDENTITY)
    damage_empty(unit_path(folder, 0), folder)
    write_unit(folder, 2, unit_rows(2), {"model": MODEL, "dataset_fingerprint": FINGERPRINT})
    damage_empty(unit_path(folder, 2), folder)
    assert check_committed(folder, 4, IDENTITY).units == set()
    assert len(list((folder / "predictions" / DAMAGED_DIR).glob("unit-000002.parquet.*"))) == 2


def test_stored_metrics_count_only_while_they_match_the_footers(tmp_path):
    folder = write_folder(tmp_path / "out")
    metrics = aggregate(folder)
    checked = check_committed(folder, 3, IDENTITY)
    assert current_metrics(folder, checked.totals) == json.loads(
        (folder / "metrics.json").read_text())
    (folder / "report.html").rename(folder / "report.html.away")  # a report file since lost
    assert current_metrics(folder, checked.totals) is None  # (the report is written again)
    (folder / "report.html.away").rename(folder / "report.html")
    write_json(folder / "metrics.json", {**metrics, "top1": 0.0})  # older than a redone unit, say
    assert current_metrics(folder, checked.totals) is None
    (folder / "metrics.json").write_text('{"n": 3')  # cut short
    assert current_metrics(folder, checked.totals) is None


@pytest.mark.parametrize(("damage", "problem"), DAMAGE[:6] + DAMAGE[8:13],
                         ids=[d.__name__[7:] for d, _ in DAMAGE[:6] + DAMAGE[8:13]])
def test_aggregate_names_a_damaged_file_in_one_line(tmp_path, capsys, damage, problem):
    folder = write_folder(tmp_path / "out")
    damage(unit_path(folder, 1), folder)
    with pytest.raises(AggregateError) as caught:
        aggregate(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder}: unit-000001.parquet: ") and problem in message
    assert message.endswith("; run the job again to redo unit 1 (it moves the file aside)")
    assert "\n" not in message
    assert cli_main(["aggregate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == f"batch-classify aggregate: {message}\n"


def test_aggregate_names_a_file_whose_rows_cannot_be_read(tmp_path, capsys):
    folder = write_folder(tmp_path / "out")
    garble_page(unit_path(folder, 2))
    assert cli_main(["aggregate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batch-classify aggregate: {folder}: unit-000002.parquet: its rows cannot be "
                          "read (OSError: ")
    assert err.endswith("; move it out of predictions/ (e.g. into predictions/_damaged/), then run the job "
                        "again to redo unit 2\n")
    assert err.count("\n") == 1


# ---------------------------------------------------------------- the job, end to end


@pytest.fixture()
def job_args(tiny_models, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", seed=5)
    return ["--model.name", str(tiny_models["efficientnet"]), "--data.path", str(corpus),
            "--output.unit_size", "2", "--runtime.batch_size", "1"]


def _predictions(rows: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["topk_ids"], [round(s, 5) for s in r["topk_scores"]], r["error"]) for k, r in rows.items()}


def test_a_rerun_repairs_damaged_unit_files(job_args, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*job_args, "--output.dir", str(out)]
    run_job(args)  # 11 items in units of 2: units 0-5
    reference_rows = read_rows(out)
    reference = json.loads((out / "metrics.json").read_text())

    damage_truncated(unit_path(out, 1), out)
    damage_empty(unit_path(out, 2), out)
    damage_other_schema(unit_path(out, 3), out)
    damage_other_dataset(unit_path(out, 4), out)  # as if copied in from a job on other images
    shutil.copy(unit_path(out, 0), unit_path(out, 5))  # renamed or copied: unit 0's rows
    check = verify(out)
    assert not check.complete
    assert [entry.split(":")[0] for entry in check.unreadable_files] == [
        f"unit-00000{u}.parquet" for u in range(1, 6)]
    assert all(entry.endswith(f"run the job again to redo unit {entry[10]} (it moves the file aside)")
               for entry in check.unreadable_files)
    assert cli_main(["verify", str(out)]) == 1
    said = capsys.readouterr().out
    assert "unit files that are damaged or another job's (5): unit-000001.parquet: cut short" in said
    assert "INCOMPLETE" in said and "Traceback" not in said
    with pytest.raises(AggregateError, match=r"unit-000001.parquet: cut short.*redo unit 1.*\(3 more such"):
        aggregate(out)
    planned = plan(parse_args(args))  # counts as the rerun will, moving nothing
    assert "1 of 6 units committed, 5 pending" in planned
    assert "5 unit file(s) damaged or of another job (first: unit-000001.parquet: cut short" in planned
    assert unit_path(out, 1).exists()

    result = run_job([*args], processes=2)
    assert "resuming: 2 of 11 items already committed (1 of 6 units)" in result.stderr
    for unit, why in [(1, "cut short"), (2, "the file is empty"), (3, "not a predictions file"),
                      (4, "written for another dataset"), (5, "its footer says it holds unit 0")]:
        assert f"predictions/unit-00000{unit}.parquet: {why}" in result.stderr, result.stderr
        assert f"unit {unit} will be run again" in result.stderr
    moved = sorted(p.name[:11] for p in (out / "predictions" / DAMAGED_DIR).iterdir())
    assert moved == [f"unit-00000{u}" for u in range(1, 6)]
    assert _predictions(read_rows(out)) == _predictions(reference_rows)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("n", "n_errors", "errors_by_type", "n_scored", "top1", "top5"):
        assert metrics[key] == reference[key], key
    check = verify(out)
    assert check.complete and not check.partial_files, check.summary()

    # A sound footer over a damaged page: verify and aggregate name it, in one line each
    garble_page(unit_path(out, 0))
    check = verify(out)
    assert not check.complete and len(check.unreadable_files) == 1
    assert check.unreadable_files[0].startswith("unit-000000.parquet: its rows cannot be read (OSError: ")
    assert cli_main(["aggregate", str(out)]) == 2
    assert "unit-000000.parquet: its rows cannot be read" in capsys.readouterr().err
    unit_path(out, 0).rename(out / "predictions" / DAMAGED_DIR / "unit-000000.parquet.by-hand")
    result = run_job([*args])
    assert "resuming: 9 of 11 items already committed (5 of 6 units)" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["top1"] == reference["top1"]
    assert verify(out).complete


def test_aggregate_finds_a_byte_flipped_inside_a_page(tmp_path, capsys):
    """aggregate reads the rows with the page checksums verified (as verify does)."""
    folder = write_folder(tmp_path / "out", n_units=1)
    write_unit(folder, 0, unit_rows(0, n=400), {"model": MODEL, "dataset_fingerprint": FINGERPRINT})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["dataset"]["n_items"] = 400
    write_json(folder / "manifest.json", manifest)
    path = unit_path(folder, 0)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    data[(chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 40] ^= 0x01
    path.write_bytes(bytes(data))
    assert cli_main(["aggregate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "unit-000000.parquet" in err and "CRC checksum verification failed" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("content", [b'{"dataset": ', b"\xff\xfe", b"[1, 2]"],
                         ids=["cut", "binary", "a list"])
def test_a_damaged_manifest_is_one_line_for_every_command(tmp_path, capsys, content):
    folder = write_folder(tmp_path / "out")
    (folder / "manifest.json").write_bytes(content)
    for command in (["aggregate", str(folder)], ["verify", str(folder)],
                    ["compare", str(folder), str(folder)]):
        assert cli_main(command) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "manifest.json is damaged" in err, (command, err)
