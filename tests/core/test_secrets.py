"""Credentials redacted wherever storage options and URLs are saved or shown (core/secrets.py)."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import yaml

from batch_classify.core.config import DataConfig, parse_args
from batch_classify.core.secrets import (
    MARKER,
    RedactingFilter,
    is_secret_name,
    keep_live,
    live_options,
    redact,
    redact_text,
    redact_url,
    restore_url,
)


def test_secret_options_are_redacted_at_any_depth_and_the_rest_kept():
    options = {
        "key": "AKIAIOSFODNN7EXAMPLE", "secret": "wJalrXUtnFEMI/K7MDENG", "token": "FwoGZXIvYXdzE",
        "endpoint_url": "https://minio:9000", "anon": False, "profile": "dev", "block_size": 1 << 20,
        "requester_pays": True, "config_kwargs": {"read_timeout": 2, "retries": {"max_attempts": 1}},
        "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "abc",
                          "headers": {"Authorization": "Bearer eyJhbGci", "Cookie": "session=1",
                                      "x-amz-security-token": "IQoJb3", "Accept": "image/*"}},
        "headers": {"Proxy-Authorization": "Basic dXNlcg==", "X-Api-Key": "k-123"},
        "password": "hunter2", "session_token": "st", "sas_token": "sv=2022&sig=abc",
        "account_name": "acct", "account_key": "base64==", "connection_string": "x", "client_secret": "cs",
        "client_id": "00000000-app", "tenant_id": "tenant", "s3_additional_kwargs": {"SSECustomerKey": "sse"},
        "credentials": [{"private_key": "-----BEGIN PRIVATE KEY-----"}], "hf_token": "hf_abc",
    }
    saved = redact(options)
    assert saved["endpoint_url"] == "https://minio:9000" and saved["anon"] is False
    assert saved["profile"] == "dev" and saved["block_size"] == 1 << 20 and saved["requester_pays"] is True
    assert saved["config_kwargs"] == options["config_kwargs"]
    assert saved["client_kwargs"]["region_name"] == "eu-west-1"
    assert saved["client_kwargs"]["headers"]["Accept"] == "image/*"
    kept = (saved["account_name"], saved["client_id"], saved["tenant_id"])
    assert kept == ("acct", "00000000-app", "tenant")
    text = json.dumps(saved)
    for value in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "FwoGZXIvYXdzE", "eyJhbGci", "session=1", "IQoJb3",
                  "dXNlcg==", "k-123", "hunter2", "sig=abc", "base64==", "BEGIN PRIVATE", "hf_abc", "sse",
                  '"abc"', '"st"', '"cs"', '"x"'):
        assert value not in text, value
    assert text.count(MARKER) == 18
    assert options["key"] == "AKIAIOSFODNN7EXAMPLE"  # the live options are left as they are


def test_values_that_are_credentials_are_redacted_whatever_their_name():
    saved = redact({"extra": {"auth_header": "x", "anything": "Bearer abc.def",
                              "conn": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=zzz==",
                              "id": "AKIAIOSFODNN7EXAMPLE", "pem": "-----BEGIN RSA PRIVATE KEY-----\nMII"},
                    "token": "anon", "gcs": {"token": "google_default"}, "nothing": None, "flag": True})
    assert saved["extra"] == dict.fromkeys(("auth_header", "anything", "conn", "id", "pem"), MARKER)
    assert saved["token"] == "anon" and saved["gcs"]["token"] == "google_default"  # ways to find them, kept
    assert saved["nothing"] is None and saved["flag"] is True
    assert all(is_secret_name(n) for n in ("Authorization", "X-Amz-Security-Token", "aws_session_token",
                                           "client-secret", "AccountKey", "sig", "X-Goog-Signature"))
    assert not any(is_secret_name(n) for n in ("endpoint_url", "anon", "profile", "block_size", "region_name",
                                                 "account_name", "requester_pays", "config_kwargs"))


def test_urls_lose_their_user_password_and_signatures_only():
    assert redact_url("https://user:pa55@host:8443/data/x.tar") == f"https://{MARKER}@host:8443/data/x.tar"
    assert redact_url("https://ghp_token@github.com/o/r") == f"https://{MARKER}@github.com/o/r"
    signed = redact_url("https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                        "AKIAIOSFODNN7EXAMPLE%2F20250101&X-Amz-Signature=deadbeef&X-Amz-Expires=3600")
    assert "deadbeef" not in signed and "AKIAIOSFODNN7EXAMPLE" not in signed
    assert "X-Amz-Expires=3600" in signed and signed.startswith("https://b.s3.amazonaws.com/k.tar?")
    sas = redact_url("https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2025&sp=r&sig=abc%3D")
    assert sas == f"https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2025&sp=r&sig={MARKER}"
    for plain in ("s3://bucket/wds/{00000..00009}.tar", "https://host/a.tar?part=1", "/data/x", "hf://datasets/a/b"):
        assert redact_url(plain) == plain
    assert restore_url(redact_url("https://u:p@host/x"), "https://u:p@host/x/{0..3}.tar") == "https://u:p@host/x"
    assert restore_url(redact_url("https://u:p@host/x"), "https://u:p@other/x") == f"https://{MARKER}@host/x"


def test_messages_and_log_lines_are_redacted(caplog):
    keep_live("s3://live-bucket/x", {"key": "AKIAIOSFODNN7EXAMPLE", "secret": "only-in-memory-42"})
    assert live_options("s3://live-bucket/other")["secret"] == "only-in-memory-42"
    assert live_options("s3://another-bucket/x") is None
    said = redact_text("GET https://me:pw@host/x failed; secret only-in-memory-42 (key AKIAIOSFODNN7EXAMPLE)")
    assert said == f"GET https://{MARKER}@host/x failed; secret {MARKER} (key {MARKER})"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "reading %s with %s",
                               ("https://u:p@h/x", "only-in-memory-42"), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"reading https://{MARKER}@h/x with {MARKER}"


def test_the_saved_spec_holds_no_credential_and_stays_useful():
    spec = parse_args(["--model.name", "m", "--data.path", "https://u:pw-in-url@host/{0..2}.tar",
                       "--data.storage_options", json.dumps({"client_kwargs": {"headers": {
                           "Authorization": "Bearer header-secret"}}, "block_size": 1 << 20}),
                       "--output.dir", "s3://out/run", "--output.storage_options",
                       json.dumps({"key": "AKIAIOSFODNN7EXAMPLE", "secret": "out-secret",
                                   "endpoint_url": "http://minio:9000"})])
    text = spec.to_yaml()
    for value in ("pw-in-url", "header-secret", "AKIAIOSFODNN7EXAMPLE", "out-secret"):
        assert value not in text
    saved = yaml.safe_load(text)
    assert saved["data"]["path"] == f"https://{MARKER}@host/{{0..2}}.tar"
    assert saved["output"]["storage_options"] == {"key": MARKER, "secret": MARKER,
                                                  "endpoint_url": "http://minio:9000"}
    assert spec.data.storage_options["client_kwargs"]["headers"]["Authorization"] == "Bearer header-secret"


def test_a_url_with_a_password_is_listed_and_read_with_it_and_saved_without(in_store, tmp_path):
    from object_servers import RangeFiles

    from batch_classify.inputs.listing import read_listing, write_listing

    server = RangeFiles(in_store["local"] / "wds")
    try:
        host = server.url.removeprefix("http://")
        url = f"http://reader:pw-Lq93x@{host}/{{00000..00002}}.tar"
        server.faults.require_authorization = "Basic cmVhZGVyOnB3LUxxOTN4"  # reader:pw-Lq93x
        cfg = DataConfig(path=url, storage_options={"block_size": 1 << 16})
        listing = write_listing(cfg, tmp_path)
        assert listing.n_units == 3
        for path in (tmp_path / "input").iterdir():
            assert b"pw-Lq93x" not in path.read_bytes(), path
            if path.suffix == ".parquet":
                assert "pw-Lq93x" not in str(pq.read_table(path).to_pylist())
        again = read_listing(tmp_path, cfg.storage_options, cfg.path)  # another rank: from its config
        assert again.root == f"http://reader:pw-Lq93x@{host}"
        assert len([r for r in again.records(1) if r.error is None]) == 5
    finally:
        server.close()


def test_a_configuration_error_does_not_quote_the_storage_options():
    import pytest

    from batch_classify.core.config import ConfigError

    for given in ('{"key": "quoted-secret-1", bad', '["quoted-secret-1"]'):
        with pytest.raises(ConfigError) as refused:
            parse_args(["--model.name", "m", "--data.path", "s3://b/x", "--output.dir", "/tmp/o",
                        "--data.storage_options", given])
        assert "quoted-secret-1" not in str(refused.value) and "storage_options" in str(refused.value)
