"""verify, aggregate and compare on an output in a store read it without writing to it (no PUT,
POST or DELETE reaches the bucket), with the job's storage options given as JSON or YAML
(--storage_options, or $BATCH_CLASSIFY_STORAGE_OPTIONS). Servers: tests/conftest.py."""

from __future__ import annotations

import json

import yaml
from conftest import read_rows, run_job
from object_servers import compared

from batch_classify.commands.cli import main as cli_main

WRITES = ("PUT", "POST", "DELETE")


def test_commands_on_an_output_in_a_bucket_only_read_it(in_store, s3, tiny_models, tmp_path, monkeypatch,
                                                       capsys, local_tars):
    fs = s3.filesystem()
    if not fs.exists("outputs"):
        fs.mkdir("outputs")
    url, options = "s3://outputs/commands", s3.options()
    run_job(["--model.name", str(tiny_models["beit"]), "--data.path", in_store["wds"],
             "--data.storage_options", json.dumps(options), "--output.dir", url,
             "--output.storage_options", json.dumps(options),
             "--output.staging", str(tmp_path / "job-staging")])
    before = {key: info["ETag"] for key, info in fs.find("outputs/commands", detail=True).items()}
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCH_CLASSIFY_STORAGE_OPTIONS", raising=False)
    start = len(s3.faults.requests)
    as_yaml = yaml.safe_dump(options, default_flow_style=True).strip()

    assert cli_main(["verify", url, "--recount", "--storage_options", json.dumps(options)]) == 0
    out = capsys.readouterr()  # the input in the bucket named again, with the options given
    assert "3 of 3 units committed; 14 rows" in out.out and out.out.rstrip().endswith("complete")
    assert "every committed unit's ids match the input, enumerated again" in out.out

    reads_of_input = sum(1 for _, path, _ in s3.faults.requests[start:] if path.startswith("/bucket/wds"))
    assert cli_main(["aggregate", url, "--storage_options", as_yaml]) == 0
    out = capsys.readouterr()
    assert "the store is left as it is" in out.err
    metrics = json.loads((tmp_path / "cache").glob("outputs/*/metrics.json").__next__().read_text())
    expected = json.loads((local_tars / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("n", "top1", "top5")} == {k: expected[k] for k in ("n", "top1", "top5")}
    # The report's pictures were read back from the input in the bucket, with the same options.
    assert sum(1 for method, path, _ in s3.faults.requests[start:] if path.startswith("/bucket/wds")) > \
        reads_of_input
    assert metrics["report_files"] and not any("could not" in line for line in out.err.splitlines())

    monkeypatch.setenv("BATCH_CLASSIFY_STORAGE_OPTIONS", as_yaml)  # the environment still works
    assert cli_main(["compare", url, str(local_tars)]) == 0
    out = capsys.readouterr()
    assert "agree" in out.out.lower()

    writes = [(method, path) for method, path, _ in s3.faults.requests[start:] if method in WRITES]
    assert writes == []
    found = fs.find("outputs/commands", detail=True, refresh=True)
    after = {key: info["ETag"] for key, info in found.items()}
    assert after == before
    assert compared(read_rows(tmp_path / "job-staging")) == compared(read_rows(local_tars))


def test_storage_options_that_are_no_mapping_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_CLASSIFY_CACHE", str(tmp_path / "cache"))
    for text in ("[1, 2]", "{endpoint_url: [", "plain words"):
        assert cli_main(["verify", "s3://outputs/none", "--storage_options", text]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("batch-classify verify: --storage_options: "), err
    assert not (tmp_path / "cache").exists()
