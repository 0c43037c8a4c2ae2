"""Object-store benchmark: the input pipeline over tars in a local S3 server against the same
tars on local disk, in one run (not a timed test).

``python -m batch_classify.bench.objects --tars 100 --dir /tmp/objects`` writes ``--tars``
WebDataset tars of JPEGs (the img2dataset layout) and reads them from local disk; then it
starts moto's S3 server on 127.0.0.1 in a process of its own, uploads them, and reads them from
the bucket. Reading is what a rank does: list the input, then every unit's records (tar
parsing, the image bytes, and with ``--decode`` each image decoded to RGB). It prints for each: listing
time, images/s, MB/s, and for the bucket the GETs per tar and the ratio to local disk. Needs
the s3 and test extras (s3fs, moto[server]).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from batch_classify.bench.scale import write_collection
from batch_classify.core.config import DataConfig
from batch_classify.core.storage import BLOCK_SIZE, request_counts, retry_counts
from batch_classify.inputs.listing import write_listing

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (not competing with the reader for the GIL)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)")


def read_all(cfg: DataConfig, folder: Path, decode: bool) -> dict[str, Any]:
    """List the input, then read every unit's records: the figures of one source."""
    start = time.perf_counter()
    listing = write_listing(cfg, folder)
    listed = time.perf_counter() - start
    requests = request_counts()
    images = size = 0
    start = time.perf_counter()
    for unit in range(listing.n_units):
        for record in listing.records(unit):
            if record.payload is None:
                continue
            images += 1
            size += len(record.payload)
            if decode:
                from PIL import Image

                with Image.open(io.BytesIO(record.payload)) as image:
                    image.convert("RGB")
    seconds = time.perf_counter() - start
    after = request_counts()
    gets = after.get("get", 0) - requests.get("get", 0)
    return {"list_s": round(listed, 2), "read_s": round(seconds, 2), "images": images,
            "images_per_s": round(images / seconds, 1), "mb_per_s": round(size / seconds / 1e6, 1),
            "tars": listing.n_units, "gets_per_tar": round(gets / listing.n_units, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_classify.bench.objects", description=__doc__)
    parser.add_argument("--tars", type=int, default=100)
    parser.add_argument("--per_tar", type=int, default=1000, help="samples per tar")
    parser.add_argument("--block_size", type=int, default=BLOCK_SIZE, help="bytes per ranged GET")
    parser.add_argument("--decode", action="store_true", help="decode every image to RGB as well")
    parser.add_argument("--dir", type=Path, default=None, help="where the tars are written")
    args = parser.parse_args(argv)
    os.environ.update({key: os.environ.get(key, value) for key, value in CREDENTIALS.items()})
    import s3fs

    with tempfile.TemporaryDirectory(prefix="bench-objects-") as scratch:
        folder = args.dir or Path(scratch)
        tars = write_collection(folder / "wds", args.tars * args.per_tar, per_tar=args.per_tar)
        os.sync()  # the tars on disk before anything is timed
        # Local disk first, before the server starts: nothing else runs while it is timed.
        local = read_all(DataConfig(path=str(folder / "wds")), Path(scratch) / "out-local", args.decode)
        server, endpoint = start_moto()
        try:
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            fs.mkdir("bench")
            for tar in tars:
                fs.put_file(str(tar), f"bench/wds/{tar.name}")
            options = {"endpoint_url": endpoint, "block_size": args.block_size}
            time.sleep(2)  # the server done with the uploads
            bucket = read_all(DataConfig(path="s3://bench/wds", storage_options=options),
                              Path(scratch) / "out-s3", args.decode)
        finally:
            server.terminate()
            server.wait()
    size = sum(tar.stat().st_size for tar in tars) if args.dir else None
    report = {"tars": args.tars, "per_tar": args.per_tar, "block_size": args.block_size,
              "decode": args.decode,
              "bytes": size, "local": local, "s3": bucket, "retries": retry_counts(),
              "ratio_to_local": round(bucket["images_per_s"] / local["images_per_s"], 2),
              "cpus": os.cpu_count()}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
