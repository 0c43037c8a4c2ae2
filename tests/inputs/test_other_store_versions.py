"""Reads pinned to the version listed and the resume check of a URL input, on gs:// and az://
against their emulators on localhost (fake-gcs-server with gcsfs, Azurite with adlfs; fixtures in
tests/conftest.py): a GCS read of a generation that was replaced, or an Azure read whose ETag no
longer matches, is "changed since it was listed", never "no such object" or the new bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_wds import jpeg, make_wds, tiny_image
from object_servers import store_job
from PIL import Image

from batch_classify.core import storage
from batch_classify.core.config import DataConfig
from batch_classify.core.storage import ObjectChanged, store_for
from batch_classify.inputs.listing import input_changes, write_listing


@pytest.fixture(scope="module", params=["gcs", "azure"])
def emulated(request):
    """One emulator (the module's tests run once for each)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def _bucket(emulated, name: str = "versions"):
    fs = emulated.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def _tar(folder: Path, first_label: int) -> bytes:
    """A tar of 5 noisy samples (over 2 blocks of 64 KiB) labelled first_label...; 100 and 905
    give tars of one size, other bytes."""
    rng = np.random.default_rng(0)
    images = [(f"k{i}", Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)), first_label + i)
              for i in range(5)]
    return make_wds(folder, images, per_tar=5)[0].read_bytes()


def test_every_read_of_a_replaced_object_at_its_listed_version_is_refused(emulated, tmp_path, fast):
    old, new = _tar(tmp_path / "a", 100), _tar(tmp_path / "b", 905)
    assert len(old) == len(new) and old != new
    fs = _bucket(emulated)
    fs.pipe_file("versions/pinned/one.tar", old)
    fs.pipe_file("versions/pinned/kept.tar", old)
    prefix = f"{emulated.scheme}://versions/pinned"
    url, kept = f"{prefix}/one.tar", f"{prefix}/kept.tar"
    store = store_for(prefix, emulated.options(block_size=1 << 16))
    pins = store.find_objects(prefix)
    assert set(pins) == {url, kept}
    assert store.pins_reads(pins[url])  # the store checks the version: no HEAD after each read
    reader = store.open(url, pin=pins[url])
    assert reader.read(1 << 16) == old[:1 << 16]  # read before the replacement
    fs.pipe_file("versions/pinned/one.tar", new)  # other bytes, the same size
    changed = rf"{url} changed since it was listed \(.*{len(old)} bytes then, .* now\)"
    with pytest.raises(ObjectChanged, match=changed):
        reader.read()
    with pytest.raises(ObjectChanged, match=changed):
        store.read_range(url, 0, 10, pins[url])
    with pytest.raises(ObjectChanged, match=changed):
        store.open(url, pin=pins[url]).read()
    with pytest.raises(ObjectChanged, match=changed):
        store.read(url, pins[url])
    many = store.read_many([url, kept], pins)
    assert isinstance(many[url], ObjectChanged) and url in str(many[url])
    assert many[kept] == old  # the object left alone reads at its pin
    assert store.read_range(kept, 100, 1100, pins[kept]) == old[100:1100]
    assert store.open(kept, pin=pins[kept]).read() == old
    # Unpinned, the same reads give the new bytes: the pin is what refuses them.
    assert store.read_range(url, 0, len(new)) == new
    # Gone since the listing: GCS answers the generation's 404 (no such object), Azure the ETag's
    # 412 (changed, gone now); either way no bytes.
    fs.rm_file("versions/pinned/one.tar")
    with pytest.raises((FileNotFoundError, ObjectChanged), match=rf"{url}.*(no such object|gone now)"):
        store.read_range(url, 0, 10, pins[url])


def test_a_parquet_file_replaced_between_two_of_its_units_is_refused(emulated, tmp_path, fast):
    def table(labels: list[int]) -> Path:
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        cells = [{"bytes": jpeg(tiny_image(i, (30, 30))), "path": None} for i in range(6)]
        path = tmp_path / f"t{labels[0]}.parquet"
        pq.write_table(pa.table({"image": pa.array(cells, image_type), "label": labels}), path,
                       row_group_size=2)
        return path
    old, new = table([100 + i for i in range(6)]), table([905 + i for i in range(6)])
    assert old.stat().st_size == new.stat().st_size
    _bucket(emulated)
    url = emulated.upload(old, "versions", "pversions/t.parquet")
    cfg = DataConfig(path=url, storage_options=emulated.options())
    listing = write_listing(cfg, tmp_path / "out", unit_size=2)
    assert listing.n_units == 3
    assert [r.label for r in listing.records(0)] == [100, 101]
    emulated.upload(new, "versions", "pversions/t.parquet")
    with pytest.raises(ObjectChanged, match=f"{url} changed since it was listed"):
        list(listing.records(1))
    change = input_changes(listing, cfg)
    assert change is not None and "1 object(s) replaced, e.g. " + url in change.describe()


def test_a_tar_of_the_same_size_with_other_bytes_refuses_the_resume(emulated, tiny_models, tmp_path):
    fs = _bucket(emulated)
    fs.pipe_file("versions/same-size/00000.tar", _tar(tmp_path / "a", 100))
    url = f"{emulated.scheme}://versions/same-size"
    model, out = tiny_models["beit"], tmp_path / "out"
    store_job(model, url, out, emulated.options())
    fs.pipe_file("versions/same-size/00000.tar", _tar(tmp_path / "b", 905))
    refused = store_job(model, url, out, emulated.options(), expect_ok=False)
    said = [line for line in refused.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert refused.returncode == 2 and len(said) == 1, refused.stderr[-2000:]
    assert f"1 object(s) replaced, e.g. {url}/00000.tar (ETag" in said[0], said[0]
    assert "output.overwrite true" in said[0]
