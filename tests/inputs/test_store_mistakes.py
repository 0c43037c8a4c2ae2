"""Every store mistake is one line naming the setting, the store and its side (input or output),
exit status 2, no traceback: a missing bucket, a 403 on any request, an unknown option (with the
closest one), an unknown scheme, an unreachable store (not an output-filesystem fault). A body
that arrives damaged is read again. Servers: tests/conftest.py (tests/object_servers.py)."""

from __future__ import annotations

import json

import pytest
from conftest import run_job

from batch_classify.core import storage
from batch_classify.core.config import ConfigError, parse_args
from batch_classify.core.storage import retry_counts, store_for


def _one_line(result, status: int = 2) -> str:
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("batch-classify: ")]
    assert len(said) == 1, result.stderr[-3000:]
    return said[0]


def _job(model, data: str, out: str, data_options: dict | None = None, out_options: dict | None = None,
         staging=None, extra: tuple[str, ...] = ()):
    args = ["--model.name", str(model), "--data.path", data, "--output.dir", out, *extra]
    if data_options is not None:
        args += ["--data.storage_options", json.dumps(data_options)]
    if out_options is not None:
        args += ["--output.storage_options", json.dumps(out_options)]
    if staging is not None:
        args += ["--output.staging", str(staging)]
    return run_job(args, expect_ok=False)


def _bucket(s3, name: str) -> None:
    fs = s3.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)


# ------------------------------------------------------------------ at config time


@pytest.mark.parametrize(("args", "said"), [
    (["--data.path", "s4://bucket/wds"],
     r"data.path s4://bucket/wds: s4:// is no store scheme \(input store\); did you mean s3://\?"),
    (["--output.dir", "gz://bucket/run"],
     r"output.dir gz://bucket/run: gz:// is no store scheme \(output store\)"),
    (["--data.storage_options", '{"endpont_url": "http://x"}'],
     r"data.storage_options.endpont_url: not an option of s3:// stores \(input store\); did you mean "
     r"endpoint_url\?"),
    (["--data.storage_options", "{config_kwargs: {read_timout: 2}}"],
     r"data.storage_options.config_kwargs.read_timout: .*\(input store\); did you mean read_timeout\?"),
    (["--output.dir", "s3://out/run", "--output.storage_options", '{"client_kwargs": {"regoin_name": "x"}}'],
     r"output.storage_options.client_kwargs.regoin_name: .*\(output store\); did you mean region_name\?"),
    (["--output.dir", "gs://out/run", "--output.storage_options", '{"tokn": "x"}'],
     r"output.storage_options.tokn: not an option of gs:// stores \(output store\); did you mean token\?"),
    (["--data.path", "az://container/wds", "--data.storage_options", '{"acount_name": "x"}'],
     r"data.storage_options.acount_name: not an option of az:// stores \(input store\); did you mean "
     r"account_name"),
])
def test_an_unknown_scheme_or_option_is_refused_naming_it_and_the_closest(args, said):
    base = {"--model.name": "m", "--data.path": "s3://bucket/wds", "--output.dir": "/tmp/out"}
    given = dict(zip(args[::2], args[1::2]))
    argv = [item for key, value in {**base, **given}.items() for item in (key, value)]
    with pytest.raises(ConfigError, match=said):
        parse_args(argv)


def test_the_options_a_store_takes_are_accepted():
    spec = parse_args(["--model.name", "m", "--data.path", "s3://bucket/wds", "--output.dir", "https://host/x",
                       "--data.storage_options", json.dumps({
                           "endpoint_url": "http://x", "anon": False, "profile": "dev",
                           "requester_pays": True,
                           "block_size": 1 << 20, "skip_instance_cache": True, "key": "k", "secret": "s",
                           "config_kwargs": {"read_timeout": 2, "retries": {"max_attempts": 1}},
                           "client_kwargs": {"region_name": "eu-west-1"}}),
                       "--output.storage_options", json.dumps({
                           "headers": {"Authorization": "Bearer x"},
                           "client_kwargs": {"headers": {"Authorization": "Bearer x"}, "trust_env": True}})])
    assert spec.data.storage_options["profile"] == "dev"


def test_a_misspelt_option_stops_the_job_in_one_line(tiny_models):
    said = _one_line(_job(tiny_models["beit"], "s3://bucket/wds", "/tmp/never-written",
                          {"endpoint_url": "http://127.0.0.1:9", "read_timout": 2}))
    assert "data.storage_options.read_timout: not an option of s3:// stores (input store)" in said


# ------------------------------------------------------------------ the store layer


def test_a_damaged_body_is_read_again(s3, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    _bucket(s3, "bucket")
    data = bytes(range(256)) * 64
    store = store_for("s3://bucket/damaged/object", s3.options())
    store.fs.pipe_file("bucket/damaged/object", data)
    before = retry_counts().get("checksum", 0)
    s3.faults.set(["corrupt"], "/bucket/damaged/object")
    assert store.read("s3://bucket/damaged/object") == data
    assert s3.faults.done["corrupt"] == 1 and retry_counts()["checksum"] == before + 1
    s3.faults.set([])


# ------------------------------------------------------------------ jobs


def test_a_missing_bucket_is_one_line_on_either_side(in_store, s3, tiny_models, tmp_path):
    model = tiny_models["beit"]
    said = _one_line(_job(model, "s3://nobucket/wds", str(tmp_path / "out"), s3.options()))
    assert said.startswith("batch-classify: data.path s3://nobucket/wds: the bucket nobucket does not exist "
                           "(input store s3://nobucket)"), said
    said = _one_line(_job(model, str(in_store["local"] / "wds"), "s3://nobucket-out/run", None, s3.options(),
                          tmp_path / "staging"))
    assert said.startswith("batch-classify: output.dir s3://nobucket-out/run: the bucket nobucket-out does "
                           "not exist (output store s3://nobucket-out); create it"), said
    # A pattern names objects of a bucket that is not there: the bucket is named, not each object.
    said = _one_line(_job(model, "s3://nobucket/wds/{00000..00002}.tar", str(tmp_path / "out"), s3.options()))
    assert "data.path s3://nobucket/wds/{00000..00002}.tar: the bucket nobucket does not exist" in said, said


def test_a_403_is_one_line_naming_the_side_of_the_request(in_store, s3, tiny_models, tmp_path):
    model, local = tiny_models["beit"], str(in_store["local"] / "wds")
    _bucket(s3, "outputs")
    try:
        s3.faults.set(["always-403"], "^/bucket/wds", methods=("GET", "HEAD"))  # listing the input
        said = _one_line(_job(model, in_store["wds"], str(tmp_path / "out"), s3.options()))
        assert said.startswith("batch-classify: data.path s3://bucket/wds: access denied (403)"), said
        assert "(input store s3://bucket)" in said
        s3.faults.set(["always-403"], "/outputs/refused/.lease.json", methods=("PUT",))  # the lease
        said = _one_line(_job(model, local, "s3://outputs/refused", None, s3.options(), tmp_path / "s1"))
        assert said.startswith("batch-classify: output.dir s3://outputs/refused: access denied (403) to "
                               "s3://outputs/refused/.lease.json (output store s3://outputs)"), said
        s3.faults.set(["always-403"], "/outputs/refused-unit/predictions/", methods=("PUT",))  # a unit
        said = _one_line(_job(model, local, "s3://outputs/refused-unit", None, s3.options(), tmp_path / "s2"))
        assert said.startswith("batch-classify: output.dir s3://outputs/refused-unit: unit-0000"), said
        assert "access denied (403)" in said and "committed in the staging folder" in said
    finally:
        s3.faults.set([])


def test_an_unreachable_input_store_is_no_output_filesystem_fault(in_store, tiny_models, tmp_path):
    options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"connect_timeout": 1}}
    said = _one_line(_job(tiny_models["beit"], "s3://bucket/wds", str(tmp_path / "out"), options))
    assert said.startswith("batch-classify: data.path s3://bucket/wds: the store could not be reached or "
                           "kept failing (input store s3://bucket)"), said
    assert "output filesystem" not in said


SIGNATURE = "b7c3f1e0d9a8signature"


@pytest.mark.parametrize("line", [
    f"https://bucket.example.org/x/i0.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}",
    f"https://account.blob.example.net/c/i0.jpg?sv=2024-01-01&sig={SIGNATURE}",
    f"https://reader:{SIGNATURE}@files.example.org/x/i0.jpg",
])
def test_a_list_naming_urls_with_credentials_is_refused_without_saving_them(tmp_path, line):
    from batch_classify.core.config import DataConfig
    from batch_classify.inputs.base import InputError
    from batch_classify.inputs.listing import write_listing

    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'a.jpg'}\n{line}\n")
    with pytest.raises(InputError, match="line 2: .* carries credentials") as refused:
        write_listing(DataConfig(path=str(listed)), tmp_path / "out")
    assert SIGNATURE not in str(refused.value)
    assert not (tmp_path / "out" / "input").exists()  # nothing listed, nothing saved


def test_a_signed_data_path_is_refused_in_one_line_without_its_signature(tmp_path):
    from batch_classify.core.config import DataConfig
    from batch_classify.inputs.base import InputError
    from batch_classify.inputs.listing import write_listing

    url = f"https://host.example.org/shards/00000.tar?X-Amz-Credential=AKIA&X-Amz-Signature={SIGNATURE}"
    with pytest.raises(InputError, match="query carries credentials") as refused:
        write_listing(DataConfig(path=url), tmp_path / "out")
    assert SIGNATURE not in str(refused.value)
    # a plain query (no credential in it) is no refusal of this kind
    from batch_classify.core.secrets import signed_query
    assert not signed_query("https://host.example.org/a.tar?download=1")
    assert signed_query(url) and not signed_query(f"https://u:{SIGNATURE}@host.example.org/a.tar")
