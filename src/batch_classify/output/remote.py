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
  host is taken over by a replace at the version seen (If-Match), so one of two jobs taking it
  over at once runs; on another host it must be deleted by hand (the message says how). Every
  rank checks that the lease is still its job's before each PUT, and stops in one line if not.
- No file goes up unless whole (not empty, Parquet magic and footer sound); completion markers
  go up after what they mark (listing.json after the listing's tables, metrics.json after the
  report); a unit object there with other bytes is replaced at the version found.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from batch_classify.core.errors import UserError, describe_error
from batch_classify.core.layout import (
    CONFIG_FILE,
    DAMAGED_DIR,
    INFO_FILE,
    INPUT_DIR,
    LOCK,
    MANIFEST,
    MARKER,
    METRICS,
    MODELS_FILE,
    PENDING_FILE,
    PREDICTIONS_DIR,
    REMOTE_FILE,
    TIMING,
    unit_of,
)
from batch_classify.core.secrets import keep_live, live_options, redact_url
from batch_classify.core.storage import (
    Store,
    VersionChanged,
    conditional_writes,
    content_md5,
    delete_if_match,
    find_versions,
    fresh_info,
    is_url,
    join,
    put_if_absent,
    put_if_match,
    store_for,
    version_tag,
)

log = logging.getLogger(__name__)

LEASE = ".lease.json"
"""The lease object at the top of an output in a store: which job writes there."""
HELD_FILE = ".lease-held.json"
"""In the staging folder: the version and token of the lease this job holds (for its ranks)."""
VERSIONS_FILE = ".versions.json"
"""In the staging folder: the version of each file in the store when last pulled or sent."""
NOT_PUSHED = frozenset({LOCK, PENDING_FILE, REMOTE_FILE, HELD_FILE, VERSIONS_FILE})
"""Local-only files of a staging folder: a host's lock, its pending units, its marker."""
SINGLE_PUT_BYTES = 64 << 20
"""Files up to this size go up in one PUT from memory; larger ones by the client's upload."""
REPLACE_TRIES = 4
"""Looks at an object (HEAD, then a conditional PUT) before a writer racing this one is reported."""
PARQUET_MAGIC = b"PAR1"


class OutputElsewhere(UserError, RuntimeError):
    """Another job holds the lease of an output in a store."""


class OutputStoreError(UserError, RuntimeError):
    """A file could not be committed to the output's store (after the store layer's retries)."""


class LeaseLost(OutputElsewhere):
    """The lease this job held is another job's now (or was deleted): it stops before sending more."""


class NotWhole(OutputStoreError):
    """A staging file that is not whole (empty, cut short): it is not sent."""


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
    lease: tuple[str | None, str] | None = None
    """The lease this job holds: its version in the store (None where the store names none) and
    the token written into it."""
    _versions: Versions | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        return store_for(self.url, self.options)

    def remote(self, path: Path) -> str:
        return join(self.url.rstrip("/"), path.relative_to(self.local).as_posix())

    # ------------------------------------------------------------ staging

    def pull(self) -> int:
        """Bring the store's files into the staging folder: those missing here, of another size,
        or changed there since they were pulled or sent (the version the store names, or the
        MD5 of the bytes, differs); files only here stay (units committed here but not yet up
        are pushed later). Returns how many were fetched."""
        store, fetched = self.store, 0
        try:
            objects = find_versions(store, self.url)
        except FileNotFoundError:
            return 0
        root = self.url.rstrip("/")
        for url, entry in objects.items():
            rel = url[len(root):].lstrip("/")
            if not rel or not _shared(Path(rel)):
                continue
            target = self.local / rel
            if self.versions.same(rel, target, entry):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.pull-{os.getpid()}")
            temporary.write_bytes(store.read(url))
            os.replace(temporary, target)
            self.versions.note(rel, target, entry.get("tag"))
            fetched += 1
        self.versions.save()
        if fetched:
            log.info("output %s: %d file(s) brought into %s", self.url, fetched, self.local)
        return fetched

    @property
    def versions(self) -> Versions:
        if self._versions is None:
            self._versions = Versions(self.local / VERSIONS_FILE)
        return self._versions

    def publish(self, path: Path, create_only: bool = False, lease_checked: bool = False) -> None:
        """One committed file to the store: one PUT of all of it, once it is checked whole, and
        while this job still holds the lease. ``create_only`` (a unit file): created only if
        absent; an object there with other bytes (damaged, or another job's) is replaced only
        at the version found."""
        url, rel = self.remote(path), path.relative_to(self.local)
        if not lease_checked:
            self.check_lease(f"{rel} is committed in the staging folder {self.local} only")
        data = path.read_bytes() if path.stat().st_size <= SINGLE_PUT_BYTES else None
        problem = whole_problem(path, data)
        if problem is not None:
            raise NotWhole(f"output.dir {self.url}: {rel} in the staging folder {self.local} was not sent "
                           f"there: {problem}; run the same command again to write it anew")
        try:
            tag = self._put(url, path, data, create_only)
        except OSError as error:
            raise OutputStoreError(
                f"output.dir {self.url}: {path.name} could not be committed there ({describe_error(error)}); "
                f"it is committed in the staging folder {path.parent}, and the same command run again "
                "sends it") from error
        self.versions.note(rel.as_posix(), path, tag)

    def _put(self, url: str, path: Path, data: bytes | None, create_only: bool) -> str | None:
        """The PUT; returns the object's new version where the store names it."""
        store = self.store
        if data is None:  # too large for one PUT from memory: the client's upload, unconditional
            store.call(url, lambda: store.fs.put_file(str(path), store.path(url)))
            found = fresh_info(store, url)  # its version, so that the next push or pull knows it
            return version_tag(found) if found is not None else None
        if not create_only:  # a file the job rewrites (manifest, metrics): its latest version
            return _overwrite(store, url, data)
        try:
            return put_if_absent(store, url, data)
        except FileExistsError:
            pass
        except (TypeError, NotImplementedError, ValueError):  # a client without create-only writes
            return _overwrite(store, url, data)
        md5 = hashlib.md5(data).hexdigest()
        for _ in range(REPLACE_TRIES):
            found = fresh_info(store, url)  # a HEAD now: the client's listing cache may not know it
            if found is None:  # deleted since the refusal
                try:
                    return put_if_absent(store, url, data)
                except FileExistsError:
                    continue
            if content_md5(found) == md5:  # these bytes already (an answer lost, a rerun)
                return version_tag(found)
            seen = version_tag(found)
            log.warning("%s: the object there is not the file committed here (%s bytes, version %s); "
                        "replacing it with the file committed here", url, found.get("size"), seen)
            if seen is None or not conditional_writes(store):  # no conditional replace: best effort
                return _overwrite(store, url, data)
            try:
                return put_if_match(store, url, data, seen)
            except VersionChanged:
                continue  # replaced again meanwhile: look again
        raise VersionChanged(errno.EEXIST, f"{url}: replaced by someone else each time it was looked at "
                             f"({REPLACE_TRIES} times)")

    def push(self, end: bool = True) -> int:
        """Every file of the staging folder the store lacks or holds at another version (unit
        files created only if absent), each checked whole first, in the order that puts every
        completion marker after what it marks: the listing's tables before listing.json, the
        manifest before the units, the units before the report, metrics.json last. ``end``:
        the job finished, so its end-of-job files (metrics, timing, the report) go up too;
        otherwise only the units and the files of the job's start. Returns how many went up."""
        self.check_lease("the files not yet sent stay in the staging folder "
                         f"{self.local}")
        store = self.store
        try:
            there = find_versions(store, self.url)
        except FileNotFoundError:
            there = {}
        files = [(path, path.relative_to(self.local)) for path in self.local.rglob("*")]
        files = sorted(((p, r) for p, r in files if p.is_file() and _shared(r)),
                       key=lambda item: (_push_order(item[1]), item[1].as_posix()))
        pushed, refused = 0, None
        for path, rel in files:
            if not end and _push_order(rel) >= END_FILES:
                continue
            entry = there.get(self.remote(path))
            if entry is not None and self.versions.same(rel.as_posix(), path, entry):
                continue
            try:
                self.publish(path, create_only=PREDICTIONS_DIR in rel.parts, lease_checked=True)
            except NotWhole as error:
                log.warning("%s", error)
                refused = refused or error
                continue
            pushed += 1
        self.versions.save()
        if refused is not None and end:  # the job is not complete in the store: one line, exit 2
            raise refused
        return pushed

    # ------------------------------------------------------------ the lease

    @property
    def lease_url(self) -> str:
        return join(self.url.rstrip("/"), LEASE)

    def acquire(self) -> None:
        """Create the lease object only if absent. One found is taken over only where its holder
        died on this host, and only by a replace at the exact version seen (If-Match), so that
        of two jobs taking over one lease at once exactly one runs; a live holder stops this job."""
        token = secrets.token_hex(16)
        with _LOCK:  # live from its first PUT on: a job of this process reading it sees it held
            _LIVE_TOKENS.add(token)
        try:
            self._acquire(token)
        except BaseException:
            with _LOCK:
                _LIVE_TOKENS.discard(token)
            raise

    def _acquire(self, token: str) -> None:
        store, url = self.store, self.lease_url
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                           "staging": str(self.local), "token": token}).encode()
        if not conditional_writes(store):
            self._acquire_unconditionally(body, token)
            return
        for _ in range(REPLACE_TRIES):
            try:
                self._hold(put_if_absent(store, url, body) or self._version_of_mine(token), token)
                return
            except FileExistsError:
                pass
            found = fresh_info(store, url)  # the version now, not a listing cache's
            if found is None:  # released meanwhile: create it again
                continue
            holder = self._holder(url)  # read after the HEAD: at that version or a later one
            if holder is not None and holder.get("token") == token:  # ours: a PUT whose answer was lost
                self._hold(version_tag(found), token)
                return
            if holder is None:
                continue
            if not _gone(holder):
                raise self._elsewhere(holder)
            log.warning("output %s: taking over the lease of a job that is gone (%s)", self.url,
                        _describe(holder))
            try:  # only the version read: a job that took it over meanwhile wins, this one looks again
                self._hold(put_if_match(store, url, body, version_tag(found) or ""), token)
                return
            except VersionChanged:
                continue
        raise OutputElsewhere(f"output.dir {self.url}: other jobs took the lease {url} each time this "
                              "one looked; run it again once they have ended")

    def _version_of_mine(self, token: str) -> str | None:
        """The version of the lease just created, where the store's answer did not name it: a
        HEAD, then the body read to see that the version is still this job's."""
        found = fresh_info(self.store, self.lease_url)
        holder = self._holder(self.lease_url) if found is not None else None
        return version_tag(found) if holder is not None and holder.get("token") == token else None

    def _acquire_unconditionally(self, body: bytes, token: str) -> None:
        """A store without conditional writes: a lease another job holds is seen and refused,
        but two jobs starting at the same moment can both write theirs (detect, not prevent);
        each reads it back, and the one that finds the other's stops."""
        store, url = self.store, self.lease_url
        holder = self._holder(url)
        if holder is not None and not _gone(holder):
            raise self._elsewhere(holder)
        store.call(url, lambda: store.fs.pipe_file(store.path(url), body))
        self._hold(None, token)
        self.check_lease("nothing is committed yet")

    def _hold(self, tag: str | None, token: str) -> None:
        self.held, self.lease = True, (tag, token)
        held = self.local / HELD_FILE  # for the other ranks, which check the lease before each PUT
        temporary = held.with_name(f".{held.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps({"tag": tag, "token": token, "host": socket.gethostname(),
                                         "pid": os.getpid()}))
        os.chmod(temporary, 0o600)
        os.replace(temporary, held)

    def _lease_held(self) -> tuple[str | None, str] | None:
        """This job's lease (version, token): this process's, or the main rank's from the staging
        folder; None where the output is written without one (a store that takes no lease)."""
        if self.lease is None:
            try:
                saved = json.loads((self.local / HELD_FILE).read_text())
                main = (saved.get("host"), saved.get("pid"))
                tag, token = saved.get("tag"), str(saved["token"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if main[0] == socket.gethostname() and _gone({"host": main[0], "pid": main[1], "token": token}):
                return None  # left by a job that is gone: no job of this folder holds a lease
            self.lease = (tag, token)
        return self.lease

    def check_lease(self, kept: str) -> None:
        """Stop (one line naming the holder) where this job's lease is no longer its own: another
        job replaced it, or it was deleted. One fresh HEAD (a GET where the store names no version)."""
        held = self._lease_held()
        if held is None:
            return
        tag, token = held
        store, url = self.store, self.lease_url
        found = fresh_info(store, url)
        if found is not None and tag is not None and conditional_writes(store) and version_tag(found) == tag:
            return
        holder = self._holder(url) if found is not None else None
        if holder is not None and holder.get("token") == token:
            return
        self.held = False  # someone else's now: not ours to send to, or to release
        now = f"it is now held by {_describe(holder)}" if holder is not None else "it was deleted"
        raise LeaseLost(f"output.dir {self.url}: this job no longer holds the lease {url} ({now}); it "
                        f"stops, and {kept}. Make sure one job writes there, then run the same command "
                        "again to finish it")

    def release(self) -> None:
        """Delete the lease, only at the version this job wrote (or, where the store cannot delete
        conditionally, only while it still names this job)."""
        if not self.held:
            return
        self.held = False
        tag, token = self.lease or (None, "")
        with _LOCK:
            _LIVE_TOKENS.discard(token)
        store, url = self.store, self.lease_url
        try:
            if tag is not None and conditional_writes(store):
                delete_if_match(store, url, tag)
            else:
                holder = self._holder(url)
                if holder is not None and holder.get("token") == token:
                    store.call(url, lambda: store.fs.rm_file(store.path(url)))
        except VersionChanged:
            log.warning("output %s: the lease %s is another job's now; it is left alone", self.url, url)
        except OSError as error:
            log.warning("output %s: the lease %s could not be removed (%s); the next job takes it "
                        "over on this host", self.url, url, error)
        with contextlib.suppress(OSError):
            (self.local / HELD_FILE).unlink(missing_ok=True)

    def _elsewhere(self, holder: dict[str, Any]) -> OutputElsewhere:
        url = self.lease_url
        return OutputElsewhere(
            f"output.dir {self.url} is in use by another job ({_describe(holder)}, lease {url}); wait "
            f"for it to end, or, if it is gone, delete {url} and run again")

    def _holder(self, url: str) -> dict[str, Any] | None:
        store = self.store
        try:
            holder = json.loads(store.read(url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}


class Versions:
    """What the store held of each file when this staging folder last pulled or sent it: its
    version (ETag or generation), and the local file's size and mtime then. Kept in the staging
    folder (``.versions.json``, never sent) so that a pull notices an object changed in the store
    although its size is the same."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            self.seen: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.seen = {}
        if not isinstance(self.seen, dict):
            self.seen = {}

    def note(self, rel: str, local: Path, tag: str | None) -> None:
        try:
            stat = local.stat()
        except OSError:
            return
        with self.lock:
            self.seen[rel] = [tag, stat.st_size, stat.st_mtime_ns]

    def same(self, rel: str, local: Path, entry: dict[str, Any]) -> bool:
        """Whether ``local`` holds the bytes of the object ``entry`` lists: its size, and the
        version noted when it was pulled or sent (the local file unchanged since), or else its
        MD5 where the store gives one. Neither known: the size alone decides (a store that names
        no version)."""
        try:
            stat = local.stat()
        except OSError:
            return False
        if stat.st_size != entry.get("size"):
            return False
        with self.lock:
            noted = self.seen.get(rel)
        tag = entry.get("tag")
        if noted is not None and tag is not None and noted == [tag, stat.st_size, stat.st_mtime_ns]:
            return True
        if entry.get("md5"):
            same = _md5_of(local) == entry["md5"]
            if same:
                self.note(rel, local, tag)
            return same
        return tag is None

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.seen)
        temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            temporary.write_text(text)
            os.replace(temporary, self.path)
        except OSError as error:  # a full staging disk: the next pull compares MD5s instead
            log.warning("output: %s could not be written (%s)", self.path, describe_error(error))
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _overwrite(store: Store, url: str, data: bytes) -> str | None:
    """One unconditional PUT; the new version where the store's answer names it."""
    answer = store.call(url, lambda: store.fs.pipe_file(store.path(url), data))
    return version_tag(answer) if isinstance(answer, dict) else None


def whole_problem(path: Path, data: bytes | None) -> str | None:
    """Why a staging file is not whole, or None: its size changed while it was read, it is
    empty (the job writes no empty file), or, for Parquet, its PAR1 magic is missing at either
    end or its footer does not parse. ``data``: its bytes, where read (else it is read here)."""
    size = path.stat().st_size
    if data is not None and len(data) != size:
        return f"it changed while it was read ({len(data)} of {size} bytes)"
    if size == 0:
        return "it is empty (0 bytes): a write that did not finish, e.g. on a full staging disk"
    if path.suffix != ".parquet":
        return None
    try:
        source = pa.BufferReader(data) if data is not None else pa.memory_map(str(path))
        with source:
            magic = len(PARQUET_MAGIC)
            if size < 3 * magic or source.read_at(magic, 0) != PARQUET_MAGIC or \
                    source.read_at(magic, size - magic) != PARQUET_MAGIC:
                return "not a whole Parquet file (no PAR1 magic at both ends: cut short)"
            pq.read_metadata(source)
    except (OSError, pa.ArrowException) as error:
        return f"its Parquet footer does not parse ({describe_error(error)})"
    return None


START_FILES = frozenset({MANIFEST, CONFIG_FILE, MODELS_FILE})
END_FILES = 4
"""Push order from here on: files the job writes at its end (timing, the report, metrics.json)."""


def _push_order(rel: Path) -> int:
    """The folder's marker (it says the folder is a job's), the listing's tables, then
    listing.json (which marks the listing whole), then the job's start files (the manifest),
    the units, timing.json, the report, and metrics.json last (which marks the report whole)."""
    if rel.name == MARKER:
        return -1
    if INPUT_DIR in rel.parts:
        return 1 if rel.name == INFO_FILE else 0
    if PREDICTIONS_DIR in rel.parts:
        return 3
    if rel.name in START_FILES:
        return 2
    if rel.name == METRICS:
        return 6
    return 4 if rel.name == TIMING else 5


def _shared(rel: Path) -> bool:
    """Whether a file of the output belongs in the store: not a host's lock, pending list or
    marker, not a temporary or a file set aside as damaged, not the lease."""
    hidden = rel.name.startswith(".") and rel.name != MARKER
    return not (hidden or rel.name in NOT_PUSHED or DAMAGED_DIR in rel.parts or rel.name == LEASE)


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder is a process of this host that no longer runs (or this process,
    where none of its jobs holds it now: a job of it that ended without releasing it)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        with _LOCK:
            return holder.get("token") not in _LIVE_TOKENS
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"


_ATTACHED: dict[str, RemoteOutput] = {}
_LOCK = threading.Lock()
_LIVE_TOKENS: set[str] = set()
"""Tokens of the leases held by jobs of this process (a lease naming this pid is not stale then)."""


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


def push_staged(output_dir: str | Path, end: bool = True) -> None:
    """The staging folder's files sent to the store (``RemoteOutput.push``)."""
    remote = remote_of(output_dir)
    if remote is not None:
        pushed = remote.push(end)
        if pushed:
            log.info("output %s: %d file(s) committed", remote.url, pushed)




def store_note(url: str, options: dict[str, Any] | None, staging: str | None,
               folders: list[str] | None = None) -> str | None:
    """What is safe in the store after a fault: '3 of 6 units are committed in s3://b/run', from
    one listing of each folder's predictions there (the count of units from the staging
    folder's listing); None where the store does not answer."""
    local = Path(staging) if staging else default_staging(url)
    try:
        n_units: int | None = int(json.loads((local / INPUT_DIR / INFO_FILE).read_text())["n_units"])
    except (OSError, ValueError, KeyError, TypeError):
        n_units = None
    store, parts = store_for(url, options), []
    for folder in folders or [""]:
        prefix = join(join(url.rstrip("/"), folder), PREDICTIONS_DIR)
        try:
            found = store.find(prefix)
        except FileNotFoundError:
            found = {}
        except (OSError, UserError):
            return None
        done = sum(1 for name in found if unit_of(Path(name)) is not None)
        of = f" of {n_units}" if n_units is not None else ""
        parts.append(f"{done}{of}" + (f" for {folder}" if folder else ""))
    return f"units committed in {url}: {', '.join(parts)} (each one whole)"
