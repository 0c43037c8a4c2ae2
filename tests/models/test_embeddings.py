"""output.embeddings: the head's input of each image, read back with pyarrow and numpy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_rows, run_job
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from batch_classify.models.embeddings import BYTES_PER_DIMENSION, head_module


def reference_embeddings(model_dir, paths) -> np.ndarray:
    """The checkpoint's own head input for each image: processor, model, a hook on the head."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    caught = []
    model.classifier.register_forward_pre_hook(lambda _m, inputs: caught.append(inputs[0].flatten(1)))
    with torch.no_grad():
        for path in paths:
            model(**processor(Image.open(path).convert("RGB"), return_tensors="pt"))
    return torch.cat(caught).numpy()


def read_embeddings(out) -> tuple[list[str], np.ndarray, pa.DataType]:
    tables = [pq.read_table(p) for p in sorted((out / "predictions").glob("*.parquet"))]
    table = pa.concat_tables(tables)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.column("id").to_pylist(), vectors, column.type


@pytest.mark.parametrize("name", ["beit", "efficientnet"])
def test_embedding_column_is_the_heads_input(name, tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models[name]), "--data.path", str(corpus), "--output.dir", str(out),
             "--output.embeddings", "true", "--runtime.batch_size", "4", "--runtime.preprocess", "processor"])
    ids, vectors, dtype = read_embeddings(out)
    assert dtype.value_type == pa.float16() and vectors.dtype == np.float16
    expected = reference_embeddings(tiny_models[name], [corpus / i for i in ids])
    assert vectors.shape == expected.shape
    np.testing.assert_allclose(vectors.astype(np.float32), expected, rtol=2e-3,
                               atol=2e-3 * np.abs(expected).max())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["embeddings"] == {"normalized": False}
    # 2 bytes per dimension per row, before compression.
    assert vectors[0].nbytes == BYTES_PER_DIMENSION * expected.shape[1]


def test_normalised_embeddings_on_two_ranks_with_the_fast_path(tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["mobilenet_v1"]), "--data.path", str(corpus),
             "--output.dir", str(out), "--output.embeddings", "true", "--output.normalize_embeddings", "true",
             "--runtime.batch_size", "3"], processes=2)
    ids, vectors, _ = read_embeddings(out)
    assert len(ids) == len(set(ids)) == 11
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # Same direction as the checkpoint's own head input (the fast path's pixels differ by rounding).
    expected = reference_embeddings(tiny_models["mobilenet_v1"], [corpus / i for i in ids])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    cosine = (vectors.astype(np.float32) * expected).sum(axis=1)
    assert cosine.min() > 0.99


def test_error_rows_have_a_null_embedding(tiny_models, corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in list(corpus.rglob("*.jpg"))[:3]:
        (data / path.name).write_bytes(path.read_bytes())
    (data / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    run_job(["--model.name", str(tiny_models["beit"]), "--data.path", str(data), "--output.dir", str(out),
             "--output.embeddings", "true"])
    rows = read_rows(out)
    assert rows["broken.jpg"]["embedding"] is None and rows["broken.jpg"]["error"] is not None
    assert sum(r["embedding"] is not None for r in rows.values()) == 3


def test_head_of_a_timm_model_is_its_classifier():
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="resnet18", num_labels=10)
    model = TimmWrapperForImageClassification(config).eval()
    assert head_module(model) is model.timm_model.get_classifier()
    assert isinstance(head_module(timm.create_model("resnet18", num_classes=3)), torch.nn.Linear)
