"""Several models on one decode: each model's folder equals its single-model run, id for id."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_job

from batch_classify.core.config import ConfigError, parse_args
from batch_classify.core.layout import INPUT_DIR, INPUT_FILES, TOP_LEVEL
from batch_classify.results.verify import verify

MODELS = ("beit", "mobilenet_v1", "efficientnet")


def _args(tiny_models, models, corpus, out, overrides) -> list[str]:
    paths = [str(tiny_models[m]) for m in models]
    names = json.dumps(paths) if len(paths) > 1 else paths[0]
    args = ["--model.name", names, "--data.path", str(corpus), "--output.dir", str(out),
            "--runtime.batch_size", "4"]
    if overrides:
        args += ["--model.overrides", json.dumps(overrides)]
    return args


@pytest.fixture(scope="module")
def single_runs(tiny_models, corpus, tmp_path_factory) -> dict[str, dict]:
    """Each model alone; BEiT through its processor (the others take the fast path)."""
    base = tmp_path_factory.mktemp("single")
    rows = {}
    for name in MODELS:
        extra = ["--runtime.preprocess", "processor"] if name == "beit" else []
        run_job([*_args(tiny_models, [name], corpus, base / name, None), *extra])
        rows[name] = read_rows(base / name)
    return rows


def _assert_same(rows, expected) -> None:
    assert sorted(rows) == sorted(expected)
    for item_id, row in rows.items():
        assert row["topk_ids"] == expected[item_id]["topk_ids"], item_id
        assert row["topk_scores"] == pytest.approx(expected[item_id]["topk_scores"], abs=1e-6)
        assert row["target"] == expected[item_id]["target"]


@pytest.mark.parametrize("processes", [1, 2])
def test_three_models_in_one_pass_equal_three_single_runs(processes, single_runs, tiny_models, corpus,
                                                          tmp_path):
    out = tmp_path / "out"
    overrides = {str(tiny_models["beit"]): {"preprocess": "processor"}}
    workers = ["--runtime.num_workers", "1"] if processes == 2 else []  # DataLoader workers pickle it
    result = run_job([*_args(tiny_models, MODELS, corpus, out, overrides), *workers], processes=processes)
    for name in MODELS:
        folder = out / name
        _assert_same(read_rows(folder), single_runs[name])
        for file in ("manifest.json", "metrics.json", "config.yaml", "report.md", "input/listing.json"):
            assert (folder / file).exists(), file
        assert verify(folder).complete
        config = (folder / "config.yaml").read_text()
        assert f"name: {tiny_models[name]}" in config and f"dir: {folder}" in config
        # Every file the job wrote has a name the ownership rules know (so a rerun may replace it).
        assert {entry.name for entry in folder.iterdir()} <= TOP_LEVEL
        assert {entry.name for entry in (folder / INPUT_DIR).iterdir()} <= INPUT_FILES
        timing = json.loads((folder / "timing.json").read_text())
        assert len(timing["model_seconds_per_rank"]) == processes
    assert {entry.name for entry in out.iterdir()} <= TOP_LEVEL | set(MODELS)
    assert "preprocess: processor" in (out / "beit" / "config.yaml").read_text()
    summary = json.loads((out / "side_by_side.json").read_text())
    assert [m["folder"] for m in summary["models"]] == list(MODELS)
    assert len(summary["agreement"]) == 3 and all(0 <= p["agreement"] <= 1 for p in summary["agreement"])
    metrics = json.loads((out / "beit" / "metrics.json").read_text())
    assert summary["models"][0]["top1"] == metrics["top1"] and summary["models"][0]["ece"] == metrics["ece"]
    table = (out / "side_by_side.md").read_text()
    assert all(name in table for name in MODELS) and "top-1 agreement" in table and "ECE" in table
    assert "images/s (pass)" in result.stdout
    models = json.loads((out / "models.json").read_text())["models"]
    assert [m["folder"] for m in models] == list(MODELS)


def test_a_lost_unit_of_one_model_is_redone_on_resume(single_runs, tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    args = _args(tiny_models, MODELS[1:], corpus, out, None)
    run_job(args)
    lost = sorted((out / "efficientnet" / "predictions").glob("unit-*.parquet"))[0]
    lost.unlink()
    result = run_job(args)
    assert "resuming" in result.stderr
    for name in MODELS[1:]:
        _assert_same(read_rows(out / name), single_runs[name])
        assert verify(out / name).complete


def test_settings_that_cannot_share_a_batch_are_refused():
    base = ["--data.path", "d", "--output.dir", "o", "--model.name", "[a, b]"]
    with pytest.raises(ConfigError, match="batch_size is shared"):
        parse_args([*base, "--model.overrides", '{"a": {"batch_size": 8}}'])
    with pytest.raises(ConfigError, match="not one of model.name"):
        parse_args([*base, "--model.overrides", '{"c": {"precision": "bf16"}}'])
    with pytest.raises(ConfigError, match="device decoding is for one model"):
        parse_args([*base, "--runtime.decode", "device"])
    spec = parse_args([*base, "--model.overrides", '{"b": {"precision": "bf16"}}'])
    assert spec.for_model("b", "o/b").runtime.precision == "bf16"
    assert spec.for_model("a", "o/a").runtime.precision == "fp32"
