"""No credential is written anywhere: storage options with keys, secrets, session tokens and an
Authorization header run the job (each rank reads and writes with the real ones, from its config),
and no file of the output, the staging folder or the bucket, and no line the job prints, holds
one. The servers are the fixtures of tests/conftest.py (tests/object_servers.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from conftest import read_rows, run_job
from object_servers import RangeFiles, compared

from batch_classify.core.layout import REMOTE_FILE

DATA_KEY, DATA_SECRET, DATA_TOKEN = "AKIADATAKEY000000001", "data-secret-Zq81vT", "data-session-token-Pw3"
OUT_KEY, OUT_SECRET = "AKIAOUTKEY0000000002", "output-secret-Hx95uY"
BEARER = "bearer-token-Kd72nM"
SECRETS = (DATA_KEY, DATA_SECRET, DATA_TOKEN, OUT_KEY, OUT_SECRET, BEARER)


def _holding_secrets(files: dict[str, bytes]) -> dict[str, list[str]]:
    return {name: [s for s in SECRETS if s.encode() in data] for name, data in files.items()
            if any(s.encode() in data for s in SECRETS)}


def _local_files(*folders: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for folder in folders for path in folder.rglob("*")
            if path.is_file()}


def test_credentials_reach_the_store_and_no_file_or_line(in_store, s3, tiny_models, tmp_path, local_tars):
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    data_options = s3.options(key=DATA_KEY, secret=DATA_SECRET, token=DATA_TOKEN)
    out_options = s3.options(key=OUT_KEY, secret=OUT_SECRET)
    staging = tmp_path / "staging"
    start = len(s3.faults.signers)
    result = run_job(["--model.name", str(tiny_models["beit"]), "--data.path", in_store["wds"],
                      "--data.storage_options", json.dumps(data_options), "--output.dir", "s3://outputs/secret",
                      "--output.storage_options", json.dumps(out_options), "--output.staging", str(staging)])
    # Every request was signed with the real keys: the input's with its own, the output's with its own.
    signed = s3.faults.signers[start:]
    reads = {key for method, path, key in signed if path.startswith("/bucket/")}
    writes = {key for method, path, key in signed if path.startswith("/outputs/secret")}
    assert reads == {DATA_KEY} and writes == {OUT_KEY}, (reads, writes)
    assert any(method == "PUT" for method, path, _ in signed
               if path.startswith("/outputs/secret/predictions/"))
    assert compared(read_rows(staging)) == compared(read_rows(local_tars))
    bucket = {key: fs.cat_file(key) for key in fs.find("outputs/secret")}
    assert {"outputs/secret/predictions/unit-000000.parquet", "outputs/secret/config.yaml"} <= set(bucket)
    files = {**_local_files(staging), **bucket, "stdout": result.stdout.encode(),
             "stderr": result.stderr.encode()}
    assert _holding_secrets(files) == {}
    # What was redacted is still said: which endpoint, which timeouts, that a key was given.
    config = (staging / "config.yaml").read_text()
    assert s3.endpoint in config and "read_timeout: 2" in config and "key: <redacted>" in config
    listing = json.loads((staging / "input" / "listing.json").read_text())
    assert listing["storage_options"]["secret"] == "<redacted>"
    assert listing["storage_options"]["endpoint_url"] == s3.endpoint
    # The staging folder and its marker are the user's alone.
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert stat.S_IMODE((staging / REMOTE_FILE).stat().st_mode) == 0o600
    assert json.loads((staging / REMOTE_FILE).read_text()) == {"url": "s3://outputs/secret"}
    # A rerun with other credentials is the same job over the same input: it resumes.
    again = run_job(["--model.name", str(tiny_models["beit"]), "--data.path", in_store["wds"],
                     "--data.storage_options", json.dumps({**data_options, "secret": DATA_SECRET + "-new"}),
                     "--output.dir", "s3://outputs/secret", "--output.storage_options",
                     json.dumps(out_options), "--output.staging", str(tmp_path / "staging-2")])
    assert "resuming" in again.stderr, again.stderr
    assert DATA_SECRET not in again.stderr + again.stdout


def test_an_authorization_header_reads_an_https_input_and_is_written_nowhere(in_store, tiny_models,
                                                                            tmp_path):
    server = RangeFiles(in_store["local"] / "wds")
    server.faults.require_authorization = f"Bearer {BEARER}"
    try:
        options = {"block_size": 1 << 16, "client_kwargs": {"headers": {"Authorization": f"Bearer {BEARER}",
                                                                        "User-Agent": "batch-classify-test"}}}
        out = tmp_path / "out"
        result = run_job(["--model.name", str(tiny_models["beit"]), "--data.path",
                          server.url + "/{00000..00002}.tar", "--data.storage_options", json.dumps(options),
                          "--output.dir", str(out)])
        assert server.faults.authorizations and set(server.faults.authorizations) == {f"Bearer {BEARER}"}
        rows = read_rows(out)
        assert len(rows) == 14 and all(row["error"] is None for row in rows.values())
        files = {**_local_files(out), "stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
        assert _holding_secrets(files) == {}
        saved = json.loads((out / "manifest.json").read_text())["config"]["data"]["storage_options"]
        assert saved["client_kwargs"]["headers"] == {"Authorization": "<redacted>",
                                                     "User-Agent": "batch-classify-test"}
    finally:
        server.close()
    assert not any(BEARER in line for line in os.environ.values())
