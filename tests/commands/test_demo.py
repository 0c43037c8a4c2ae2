"""The embedded default: real EfficientNet-Lite0 weights on scikit-image's photos, 2 CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, read_rows

from batch_classify.core.labels import imagenet_classes

CAT_CLASSES = {"n02123045", "n02123159", "n02123394", "n02123597", "n02124075"}  # 281-285


def test_demo_runs_two_ranks_and_finds_the_cat(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "batch_classify", "demo", "--output.dir",
                             str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rank(s) on cpu" in result.stderr
    rows = read_rows(out)
    assert len(rows) >= 10 and all(row["error"] is None for row in rows.values())
    wnids = imagenet_classes()[0]
    assert wnids[rows["chelsea.png"]["topk_ids"][0]] in CAT_CLASSES
    assert "espresso" in rows["coffee.png"]["topk_labels"][0]
    # Each image is printed with its top label.
    chelsea_line = next(line for line in result.stdout.splitlines() if line.startswith("chelsea.png"))
    assert rows["chelsea.png"]["topk_labels"][0] in chelsea_line
    # Both ranks took part (units go to whichever is free; each image is a unit of its own here).
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing["items_per_rank"]) == 2 and sum(timing["items_per_rank"]) == len(rows)
