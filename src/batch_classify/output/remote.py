"""``output.dir`` in an object store (``s3://bucket/run``): the job writes into a local staging
folder, as it writes any output folder, and every file it commits there is committed to the
store by one PUT of the whole file (never a partial object: an upload that fails leaves
nothing, and S3 makes a single PUT visible whole or not at all).

- ``attach`` maps the URL to its staging folder (``output.staging``, default
  ``~/.cache/batch-classify/outputs/<digest of the URL>``) and marks it with ``.remote.json``;
  ``pull`` brings what the store holds into it first, so a resume, ``verify``, ``aggregate``,
  ``compare`` and the report read what was committed there.
- Unit files are PUT as they are committed (``publish``, called by the writer's thread), with
  ``If-None-Match: *`` where the store honours it (create only if absent); the listing,
  manifest, config, metrics and report are PUT by ``push`` once written.
- Two jobs on one output: the main rank holds a lease object, ``.lease.json``, created only if
  absent; a second job finds it and stops, naming the holder. A lease whose holder died on this
  host is taken over; on another host it must be deleted by hand (the message says how).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch_classify.core.errors import UserError, describe_error
from batch_classify.core.layout import (
    DAMAGED_DIR,
    LOCK,
    MANIFEST,
    MARKER,
    PENDING_FILE,
    PREDICTIONS_DIR,
    REMOTE_FILE,
)
from batch_classify.core.secrets import keep_live, live_options, redact_url
from batch_classify.core.storage import Store, is_url, join, store_for

log = logging.getLogger(__name__)

LEASE = ".lease.json"
"""The lease object at the top of an output in a store: which job writes there."""
NOT_PUSHED = frozenset({LOCK, PENDING_FILE, REMOTE_FILE})
"""Local-only files of a staging folder: a host's lock, its pending units, its marker."""
SINGLE_PUT_BYTES = 64 << 20
"""Files up to this size go up in one PUT from memory; larger ones by the client's upload."""


class OutputElsewhere(UserError, RuntimeError):
    """Another job holds the lease of an output in a store."""


class OutputStoreError(UserError, RuntimeError):
    """A file could not be committed to the output's store (after the store layer's retries)."""


def default_staging(url: str) -> Path:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    base = Path(os.environ.get("BATCH_CLASSIFY_CACHE", Path.home() / ".cache" / "batch-classify"))
    return base / "outputs" / digest


@dataclass
class RemoteOutput:
    """An output folder in a store and its local staging folder."""

    url: str
    local: Path
    options: dict[str, Any] = field(default_factory=dict)
    held: bool = False
    """Whether this process holds the output's lease (only then does the job send its files)."""

    @property
    def store(self) -> Store:
        return store_for(self.url, self.options)

    def remote(self, path: Path) -> str:
        return join(self.url.rstrip("/"), path.relative_to(self.local).as_posix())

    # ------------------------------------------------------------ staging

    def pull(self) -> int:
        """Bring the store's files into the staging folder (those missing or of another size);
        files only here stay (units committed here but not yet up are pushed later). Returns
        how many were fetched."""
        store, fetched = self.store, 0
        try:
            objects = store.find(self.url)
        except FileNotFoundError:
            return 0
        root = self.url.rstrip("/")
        for url, size in objects.items():
            rel = url[len(root):].lstrip("/")
            if not rel or not _shared(Path(rel)):
                continue
            target = self.local / rel
            if target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.pull-{os.getpid()}")
            temporary.write_bytes(store.read(url))
            os.replace(temporary, target)
            fetched += 1
        if fetched:
            log.info("output %s: %d file(s) brought into %s", self.url, fetched, self.local)
        return fetched

    def publish(self, path: Path, create_only: bool = False) -> None:
        """One committed file to the store: one PUT of all of it."""
        url, store = self.remote(path), self.store
        data = path.read_bytes() if path.stat().st_size <= SINGLE_PUT_BYTES else None

        def put() -> None:
            if data is None:
                store.fs.put_file(str(path), store.path(url))
            elif create_only:
                store.fs.pipe_file(store.path(url), data, mode="create")
            else:
                store.fs.pipe_file(store.path(url), data)

        try:
            self._put(url, put, data)
        except OSError as error:
            raise OutputStoreError(
                f"output.dir {self.url}: {path.name} could not be committed there ({describe_error(error)}); "
                f"it is committed in the staging folder {path.parent}, and the same command run again "
                "sends it") from error

    def _put(self, url: str, put: Any, data: bytes | None) -> None:
        store = self.store
        try:
            store.call(url, put)
        except FileExistsError:  # created only if absent, and present: the same bytes, or not ours
            if store.size(url) != len(data or b""):
                log.warning("%s: replacing the object there (another size) with the unit "
                            "committed here", url)
                store.call(url, lambda: store.fs.pipe_file(store.path(url), data))
        except (TypeError, NotImplementedError, ValueError):  # a client without create-only writes
            store.call(url, lambda: store.fs.pipe_file(store.path(url), data))

    def push(self) -> int:
        """Every file of the staging folder the store lacks or holds at another size (unit
        files created only if absent). Returns how many went up."""
        store = self.store
        try:
            there = store.find(self.url)
        except FileNotFoundError:
            there = {}
        pushed = 0
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local)
            if not path.is_file() or not _shared(rel):
                continue
            if there.get(self.remote(path)) == path.stat().st_size and not _rewritten(rel):
                continue
            self.publish(path, create_only=PREDICTIONS_DIR in rel.parts)
            pushed += 1
        return pushed

    # ------------------------------------------------------------ the lease

    def acquire(self) -> None:
        """Create the lease object (only if absent); a live holder elsewhere stops this job."""
        store, url = self.store, join(self.url.rstrip("/"), LEASE)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                "staging": str(self.local)}
        body = json.dumps(mine).encode()
        for _ in range(2):
            try:
                store.call(url, lambda: store.fs.pipe_file(store.path(url), body, mode="create"))
                self.held = True
                return
            except FileExistsError:
                holder = self._holder(url)
                if holder is None or not _gone(holder):
                    raise OutputElsewhere(
                        f"output.dir {self.url} is in use by another job ({_describe(holder)}, lease "
                        f"{url}); wait for it to end, or, if it is gone, delete {url} and run again"
                    ) from None
                log.warning("output %s: taking over the lease of a job that is gone (%s)", self.url,
                            _describe(holder))
                store.call(url, lambda: store.fs.rm_file(store.path(url)))
            except (TypeError, NotImplementedError, ValueError):  # no create-only writes: detect only
                store.call(url, lambda: store.fs.pipe_file(store.path(url), body))
                self.held = True
                return
        raise OutputElsewhere(f"output.dir {self.url}: another job took the lease {url} meanwhile")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        store, url = self.store, join(self.url.rstrip("/"), LEASE)
        try:
            holder = self._holder(url)
            if holder is not None and holder.get("pid") == os.getpid() and \
                    holder.get("host") == socket.gethostname():
                store.call(url, lambda: store.fs.rm_file(store.path(url)))
        except OSError as error:
            log.warning("output %s: the lease %s could not be removed (%s); the next job takes it "
                        "over on this host", self.url, url, error)

    def _holder(self, url: str) -> dict[str, Any] | None:
        store = self.store
        try:
            return json.loads(store.read(url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}


def _shared(rel: Path) -> bool:
    """Whether a file of the output belongs in the store: not a host's lock, pending list or
    marker, not a temporary or a file set aside as damaged, not the lease."""
    hidden = rel.name.startswith(".") and rel.name != MARKER
    return not (hidden or rel.name in NOT_PUSHED or DAMAGED_DIR in rel.parts or rel.name == LEASE)


def _rewritten(rel: Path) -> bool:
    """Files the job writes again under the same name (the manifest, metrics, the report): pushed
    whenever they differ in size, and also when they do not (their bytes may differ)."""
    return PREDICTIONS_DIR not in rel.parts and "input" not in rel.parts


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder is a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return holder["pid"] == os.getpid()


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"


_ATTACHED: dict[str, RemoteOutput] = {}
_LOCK = threading.Lock()


def attach(url: str, options: dict[str, Any] | None = None, staging: str | None = None) -> RemoteOutput:
    """The staging folder of an output in a store (private to the user: created 0700), marked
    with the URL it is staged for (``.remote.json``, 0600; its credentials redacted, and no
    storage options: every process that writes attaches with the options of its own config)."""
    local = Path(staging) if staging else default_staging(url)
    if not local.is_dir():
        local.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        local.mkdir(mode=0o700, exist_ok=True)
    if not staging:  # the cache's own folder: private whatever the umask made it
        os.chmod(local, 0o700)
    _write_private(local / REMOTE_FILE, json.dumps({"url": redact_url(url.rstrip("/"))}) + "\n")
    keep_live(url, options)
    remote = RemoteOutput(url.rstrip("/"), local.resolve(), dict(options or {}))
    with _LOCK:
        _ATTACHED[str(remote.local)] = remote
    return remote


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only (a new file, then a rename)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def remote_of(output_dir: str | Path) -> RemoteOutput | None:
    """The store an output (or a model's sub-folder of it) is staged for, or None. A process
    that did not attach it finds the URL in the staging folder's marker, and opens the store
    with the options it was given for that store (``keep_live``), else with none (the store's
    environment variables and files)."""
    folder = Path(output_dir).resolve()
    for candidate in (folder, folder.parent):
        key = str(candidate)
        with _LOCK:
            if key in _ATTACHED:
                return _ATTACHED[key]
        marker = candidate / REMOTE_FILE
        if marker.is_file():
            url = json.loads(marker.read_text())["url"]
            remote = RemoteOutput(url, candidate, live_options(url) or {})
            with _LOCK:
                _ATTACHED[key] = remote
            return remote
    return None


def publish_unit(output_dir: str | Path, path: Path) -> None:
    """A unit file just committed locally, committed to the store where the output is there."""
    remote = remote_of(output_dir)
    if remote is not None:
        remote.publish(path, create_only=True)


OPTIONS_VARIABLE = "BATCH_CLASSIFY_STORAGE_OPTIONS"
"""For the commands given an output in a store (verify, aggregate, compare): its options, as JSON
or YAML, where --storage_options is not given."""


def staged(output_dir: str, options: dict[str, Any] | None = None,
           data_options: dict[str, Any] | None = None) -> str:
    """``output_dir`` itself, or for a URL its staging folder with the store's files pulled (reads
    only: nothing is written to the store). ``data_options``: for reading the folder's input
    (default: ``options`` where the input's scheme is the output's)."""
    folder = output_dir
    if is_url(output_dir):
        remote = attach(output_dir, options)
        remote.pull()
        folder = str(remote.local)
    data_path = _input_of(folder)
    if data_path is not None and is_url(data_path):
        same = urlsplit(data_path).scheme == urlsplit(output_dir).scheme
        keep_live(data_path, data_options if data_options is not None else options if same else None)
    return folder


def _input_of(folder: str) -> str | None:
    """The input's URL (redacted) as the folder's manifest names it, or None."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["dataset"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def push_staged(output_dir: str | Path) -> None:
    remote = remote_of(output_dir)
    if remote is not None:
        pushed = remote.push()
        if pushed:
            log.info("output %s: %d file(s) committed", remote.url, pushed)


