"""Objects in a store (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``): one layer over
fsspec that every input kind reads through, with the store's retries made ours.

- A ``Store`` is a URL's filesystem built from ``data.storage_options`` (endpoint, anonymous
  access, requester pays, profile ...; credentials otherwise come from the store's usual
  environment variables and files). The store's client is installed as an extra
  (``pip install 'batch-classify[s3]'``, ``gcs``, ``azure``, ``hf``, ``http``).
- Reading suits the store: ``RangedReader`` fetches an object in a few large ranged GETs
  (``BLOCK_SIZE``, ``block_size`` in data.storage_options), never thousands of small ones.
- Transient faults (a dropped connection, a timeout, 500/503 SlowDown) are retried by
  ``Store.call`` with exponential backoff and full jitter, ``MAX_TRIES`` in all; a read
  resumes at the byte it had reached. The first retry of each kind is logged as a warning, the
  rest are counted (``retry_counts``). The client's own retries are turned down to one try so
  that retries are counted once, here. A missing or forbidden object is not retried: it raises
  FileNotFoundError or PermissionError naming the URL, which fails the unit as a local file
  that is gone does.
- Every read is pinned to the version listed (``ObjectInfo``: size, ETag, version id or
  generation): S3 GETs carry ``If-Match`` (and ``VersionId`` where the listing has one), HTTP(S)
  ``If-Match`` (``If-Unmodified-Since`` where the server gives only Last-Modified), gs:// the
  generation, az:// the ETag. An object changed since listing raises ``ObjectChanged``, never
  read. Stores without conditional reads (hf://, others) are checked with a fresh HEAD instead
  (``Store.check``), which the kinds call before a unit's last record.
- Every request has a deadline: ``request_timeout_s`` plus the bytes asked for at ``min_rate``
  bytes per second (data.storage_options); a stalled or trickling transfer is cancelled and
  retried as a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import io
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from batch_classify.core.errors import UserError
from batch_classify.core.secrets import redact_text

log = logging.getLogger(__name__)

BLOCK_SIZE = 32 << 20
"""Bytes per ranged GET of a sequential read (a tar): a 64 MB tar is 2-3 GETs."""
MAX_TRIES = 6
"""Tries of one request in all; the waits between them add up to about 6 s at most."""
BACKOFF_S = 0.2
"""The first wait; each later one doubles, up to MAX_BACKOFF_S, and is drawn at random below it."""
MAX_BACKOFF_S = 4.0
REQUEST_TIMEOUT_S = 60.0
"""Seconds one request may take before its bytes are counted (data.storage_options.request_timeout_s)."""
MIN_RATE = 1 << 20
"""Bytes per second a transfer must keep up on top of that (data.storage_options.min_rate): a
32 MiB block may take 60 + 32 s, a body trickling a byte a second is cut off and retried."""
OWN_OPTIONS = ("block_size", "request_timeout_s", "min_rate")
"""data.storage_options keys read here, not passed on to the store's client."""

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
          "abfss": "azure", "adl": "azure", "hf": "hf", "http": "http", "https": "http"}
"""Which extra of the package installs each scheme's client."""

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
T = TypeVar("T")


def scheme(text: str) -> str | None:
    """The scheme of a URL (``s3``), or None for a local path (``file://`` is local)."""
    found = _URL.match(str(text))
    if found is None or found.group(1).lower() == "file":
        return None
    return found.group(1).lower()


def is_url(text: object) -> bool:
    """Whether ``text`` names an object in a store rather than a local path."""
    return isinstance(text, str) and scheme(text) is not None


def join(root: str, rel: str) -> str:
    """``rel`` under the URL ``root`` (``s3://b/p`` + ``a.tar``)."""
    return f"{root.rstrip('/')}/{rel}" if rel else root


FOLDER_MARKERS = ("/", "_$folder$")
"""How zero-byte folder markers end: ``val/`` (what storage consoles create for a folder) and
``val_$folder$`` (Hadoop's S3 clients)."""


def is_folder_marker(name: str, size: int | None) -> bool:
    """Whether a listed object is a zero-byte folder marker rather than data."""
    return not size and str(name).endswith(FOLDER_MARKERS)


VERSION_MARKS = {"s3": "?versionId=", "s3a": "?versionId=", "az": "?versionid=", "abfs": "?versionid=",
                 "abfss": "?versionid="}
"""What each store's client reads as the start of a version id in a path, whatever follows."""


def unnamable(url: str, options: dict[str, Any] | None = None) -> str | None:
    """Why the store's client cannot name the object ``url`` (its key holds what the client takes
    for a version id: s3fs ``?versionId=``, adlfs ``?versionid=``, gcsfs with version_aware a
    ``#<number>`` or ``?generation=<number>``), or None. Other characters (``?``, ``#``, ``%``,
    spaces, any Unicode) are read as written."""
    protocol, key = scheme(url), url.split("://", 1)[-1]
    mark = VERSION_MARKS.get(protocol or "")
    if mark and mark in key:
        return f"its key holds {mark!r}, which the {protocol}:// client reads as a version id"
    if protocol in ("gs", "gcs") and (options or {}).get("version_aware"):
        parts = urlsplit(key)
        generation = parts.fragment or parse_qs(parts.query).get("generation", [""])[0]
        if generation.strip().isdigit():
            return f"its key holds {'#' if parts.fragment else '?generation='}{generation}, which the " \
                   "gs:// client reads as a generation with version_aware"
    return None


SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
"""Schemes that name the same store (one fsspec filesystem)."""


def normal_key(key: str) -> str | None:
    """A key with repeated slashes, ``.`` segments and a trailing slash dropped and ``..``
    segments resolved, as a path is; None where ``..`` climbs above the bucket."""
    parts: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def canonical_url(url: str) -> str:
    """One spelling of a URL, for telling whether two name the same object or prefix: the
    scheme's usual name (``s3a://`` is ``s3://``) and the key as ``normal_key`` makes it
    (HTTP(S) paths are kept as written: a server may tell them apart). ValueError where
    ``..`` climbs above the bucket."""
    head, rest = url.split("://", 1)
    protocol = SCHEME_ALIASES.get(head.lower(), head.lower())
    if protocol in ("http", "https"):
        host, slash, path = rest.partition("/")
        return f"{protocol}://{host.lower()}{slash}{path}".rstrip("/")
    bucket, _, key = rest.lstrip("/").partition("/")
    normal = normal_key(key)
    if normal is None:
        raise ValueError(f"{url}: '..' leads above the bucket {bucket!r}")
    return f"{protocol}://{bucket}/{normal}".rstrip("/")


# ------------------------------------------------------------------ faults


class StoreError(OSError):
    """A request that still failed after MAX_TRIES tries (a transient fault that did not pass)."""


_TRANSIENT_TEXT = ("slowdown", "slow down", "reduce your request rate", "service unavailable",
                   "internal error", "internalerror", "serviceunavailable", "throttl", "timed out",
                   "timeout", "connection reset", "connection aborted", "server disconnected",
                   "payload", "incompleteread", "incomplete read", "response ended prematurely",
                   "connection closed", "broken pipe", "temporarily", "too many requests",
                   "requesttimeout", "bad gateway", "gateway", "could not connect", "cannot connect",
                   "connection refused", "name resolution", "temporary failure")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _chain(error: BaseException) -> list[BaseException]:
    """An error and its causes and contexts, each once, outermost first."""
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def fault_kind(error: BaseException) -> str | None:
    """The kind of a transient fault (``SlowDown``, ``timeout``, ``connection``, ``server error``),
    or None where retrying cannot help (missing, forbidden, a bad request)."""
    chain = _chain(error)
    if any(isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          ObjectChanged)) for e in chain[:1]):
        return None
    for e in chain:
        status = _status(e)
        text = f"{type(e).__name__} {e}".lower()
        if "checksum" in text and ("mismatch" in text or "flexiblechecksumerror" in text):
            return "checksum"
        if "slowdown" in text or "slow down" in text or "reduce your request rate" in text:
            return "SlowDown"
        if type(e).__name__ == "FlexibleChecksumError" or "did not match calculated checksum" in text:
            return "checksum"  # the body arrived damaged: read again
        if isinstance(e, (TimeoutError, RequestDeadline)) or "timeout" in text or "timed out" in text:
            return "timeout"
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return f"HTTP {status}"
        if isinstance(e, ConnectionError) or any(word in text for word in _TRANSIENT_TEXT):
            return "connection"
    return None


def _status(error: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp's ``status``, azure's ``status_code``, botocore's
    response metadata), where it carries one."""
    for name in ("status", "status_code", "code"):
        value = getattr(error, name, None)
        if isinstance(value, int):
            return value
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


def _precondition_failed(error: BaseException) -> bool:
    """Whether a read was refused because its object is not the version it was pinned to (412)."""
    current: BaseException | None = error
    seen = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__} {current}".lower()
        if _status(current) == 412 or "preconditionfailed" in text or "pre-conditions you specified" in text \
                or "conditionnotmet" in text or "resourcemodified" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class ObjectChanged(OSError):
    """An object that is no longer the version listed: its unit stops, and is not committed."""

    way_out = ("choose a new output.dir to classify the input as it is now, or set output.overwrite "
               "true to list it again, or restore the object")

    def __init__(self, url: str, listed: ObjectInfo, now: ObjectInfo | None) -> None:
        now_text = "gone now" if now is None else f"{now.describe()} now"
        super().__init__(f"{url} changed since it was listed ({listed.describe()} then, {now_text})")


class RequestDeadline(OSError):
    """A request that did not finish within its deadline (cancelled; retried as a timeout). Not
    a TimeoutError: fsspec's sync would replace it by an FSTimeoutError without its message."""


class _Requests:
    """Requests made through Store in this process, by kind (``get``: ranged reads; ``info``: a
    HEAD where the listing did not cache the answer)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1


REQUESTS = _Requests()


def request_counts() -> dict[str, int]:
    """Requests made through Store in this process, retries included, by kind."""
    with REQUESTS.lock:
        return dict(REQUESTS.counts)


class _Retries:
    """Retries by kind in this process; the first of each kind is logged as a warning."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def note(self, kind: str, what: str, error: BaseException, wait: float) -> None:
        with self.lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        message = (f"object store: {what}: {kind} ({type(error).__name__}: {str(error)[:200]}); "
                   f"retrying in {wait:.1f} s")
        if first:
            log.warning("%s; later retries of this kind are counted, not logged", message)
        else:
            log.debug(message)


RETRIES = _Retries()


def retry_counts() -> dict[str, int]:
    """Retries in this process so far, by kind."""
    with RETRIES.lock:
        return dict(RETRIES.counts)


def retry_summary() -> str | None:
    """One line counting the retries of this process, or None where there were none."""
    counts = retry_counts()
    if not counts:
        return None
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"object store: {sum(counts.values())} request(s) retried ({kinds})"


def with_retries(what: str, request: Callable[[], T], tries: int = MAX_TRIES) -> T:
    """``request()``, tried again after a transient fault with exponential backoff and full
    jitter; a missing or forbidden object, or the last failure, raises."""
    for attempt in range(1, tries + 1):
        try:
            return request()
        except ObjectChanged:
            raise
        except Exception as error:  # sorted by fault_kind: transient, or raised
            kind = fault_kind(error)
            if kind is None:
                raise _plain(error, what) from error
            if attempt == tries:
                raise StoreError(errno.EIO, redact_text(  # the message may go into an error row
                    f"{what}: still failing after {tries} tries ({kind}: {type(error).__name__}: "
                    f"{str(error)[:200]})")) from error
            wait = random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)))
            RETRIES.note(kind, what, error, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _plain(error: BaseException, what: str) -> BaseException:
    """A missing or forbidden object as the OSError a local file gives, naming the URL (without
    its credentials: the message may go into an error row)."""
    from batch_classify.core.secrets import redact_url

    what = redact_url(what)
    text = f"{type(error).__name__} {error}".lower()
    status = _status(error)
    if isinstance(error, FileNotFoundError) or status == 404 or "nosuchkey" in text or "not found" in text:
        return FileNotFoundError(errno.ENOENT, f"{what}: no such object (404)")
    if isinstance(error, PermissionError) or status == 403 or "accessdenied" in text or "forbidden" in text:
        return PermissionError(errno.EACCES, f"{what}: access denied (403); check the credentials "
                               "or data.storage_options")
    return error


# ------------------------------------------------------------------ the store


def _client_defaults(protocol: str) -> dict[str, Any]:
    """Options that make the client try once, so that retries happen (and are counted) here."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
    return {}


def _filesystem_class(protocol: str, options: dict[str, Any]) -> Any:
    """The client class where the scheme's registered one does not fit ``options``, else None.

    gcsfs registers a class that first asks Google's storage-control service (gRPC) about each
    bucket's layout; a GCS-compatible endpoint of its own (``endpoint_url``: an emulator, a
    gateway) has no such service, and every first request to a bucket would wait for that
    question to time out (60 s, several times). The plain JSON-API client is what such an
    endpoint serves."""
    if protocol in ("gs", "gcs") and options.get("endpoint_url"):
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem
    return None


def _merged(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class ObjectInfo:
    """An object's identity as a listing gave it: its size, ETag and version (an S3 VersionId,
    a GCS generation, an Azure version id, or an HTTP Last-Modified where there is no ETag)."""

    size: int
    etag: str | None = None
    version: str | None = None

    @property
    def token(self) -> str:
        """The identity as one string (listing files store it); ``parse`` reads it back."""
        return f"{self.etag or ''}\t{self.version or ''}"

    @classmethod
    def parse(cls, size: int, token: str | None) -> ObjectInfo:
        etag, _, version = (token or "").partition("\t")
        return cls(int(size), etag or None, version or None)

    def same(self, other: ObjectInfo) -> bool:
        """Whether ``other`` is this version: the same size, and the same ETag and version where
        both are known."""
        return (self.size == other.size
                and (self.etag is None or other.etag is None or self.etag == other.etag)
                and (self.version is None or other.version is None or self.version == other.version))

    def describe(self) -> str:
        parts = [f"ETag {self.etag}"] if self.etag else []
        parts += [f"version {self.version}"] if self.version else []
        return ", ".join([*parts, f"{self.size} bytes"])


def identity(protocol: str, entry: dict[str, Any]) -> ObjectInfo:
    """The ObjectInfo of one entry of the store's listing (or HEAD), as its client names the fields."""
    size = int(entry.get("size") or 0)
    if protocol in ("s3", "s3a"):
        version = entry.get("VersionId")
        return ObjectInfo(size, entry.get("ETag") or entry.get("etag"),
                          version if version not in (None, "null") else None)
    if protocol in ("gs", "gcs"):
        generation = entry.get("generation")
        return ObjectInfo(size, entry.get("etag"), str(generation) if generation else None)
    if protocol in ("az", "abfs", "abfss", "adl"):
        return ObjectInfo(size, entry.get("etag"), entry.get("version_id"))
    if protocol in ("http", "https"):
        return ObjectInfo(size, entry.get("ETag"), entry.get("Last-Modified"))
    if protocol == "hf":
        lfs = entry.get("lfs") or {}
        return ObjectInfo(size, entry.get("blob_id") or lfs.get("sha256") or lfs.get("oid"))
    return ObjectInfo(size, entry.get("etag") or entry.get("ETag"), None)


def _folder_marker(path: str, entry: dict[str, Any]) -> bool:
    """A zero-byte folder marker (``val/``, Hadoop's ``val_$folder$``): what storage consoles and
    Hadoop's clients create for a "folder", no data."""
    name = str(entry.get("Key") or entry.get("name") or path)
    return is_folder_marker(name, entry.get("size")) or is_folder_marker(path, entry.get("size"))


@dataclass
class Store:
    """The filesystem of one URL's scheme, opened with ``options`` (data.storage_options)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return scheme(self.url) or "file"

    @property
    def block_size(self) -> int:
        return int(self.options.get("block_size") or BLOCK_SIZE)

    def deadline(self, nbytes: int) -> float:
        """Seconds a request for ``nbytes`` may take in all."""
        base = float(self.options.get("request_timeout_s") or REQUEST_TIMEOUT_S)
        return base + max(0, nbytes) / float(self.options.get("min_rate") or MIN_RATE)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (fsspec caches one per scheme and options)."""
        try:
            import fsspec
        except ImportError:
            raise _missing_client(self.protocol) from None
        client = {k: v for k, v in self.options.items() if k not in OWN_OPTIONS}
        try:
            opened = _filesystem_class(self.protocol, client) or fsspec.get_filesystem_class(self.protocol)
            fs = opened(**_merged(_client_defaults(self.protocol), client))
        except ImportError:
            raise _missing_client(self.protocol) from None
        if hasattr(fs, "retries") and self.protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own loop (5 tries) would hide faults from ours
        return fs

    def path(self, url: str) -> str:
        """The store's own name for ``url`` (``bucket/key``)."""
        return url if self.protocol in ("http", "https") else self.fs._strip_protocol(url)

    def to_url(self, path: str) -> str:
        if self.protocol in ("http", "https") or is_url(path):
            return path
        return f"{self.protocol}://{path}"

    def call(self, what: str, request: Callable[[], T]) -> T:
        return with_retries(what, request)

    # -------------------------------------------------------------- bounded requests

    def _bounded(self, nbytes: int, request: Callable[[], Any], what: str) -> Any:
        """``request()`` within ``deadline(nbytes)``: on an async filesystem it returns a
        coroutine, run on the filesystem's loop and cancelled at the deadline; otherwise it runs
        on a worker thread that is abandoned at the deadline (a sync client cannot be cancelled)."""
        seconds = self.deadline(nbytes)
        fs = self.fs
        if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            from fsspec.asyn import sync

            return sync(fs.loop, _within, request, seconds, what)
        return _in_thread(request, seconds, what)

    def _listed_info(self, url: str, fresh: bool = False) -> dict[str, Any]:
        fs, path = self.fs, self.path(url)
        if fresh:
            fs.invalidate_cache(path)  # a listing cache would answer with the old version
        if getattr(fs, "async_impl", False) and hasattr(fs, "_info"):
            return self._bounded(0, lambda: fs._info(path), url)
        return self._bounded(0, lambda: fs.info(path), url)

    def info(self, url: str, fresh: bool = False) -> dict[str, Any]:
        def head() -> dict[str, Any]:
            REQUESTS.add("info")
            return self._listed_info(url, fresh)
        return self.call(url, head)

    def size(self, url: str) -> int:
        return int(self.info(url)["size"])

    def object_info(self, url: str, fresh: bool = False) -> ObjectInfo:
        """The identity of one object by a HEAD (``fresh``: past any listing cache)."""
        return identity(self.protocol, self.info(url, fresh))

    def is_file(self, url: str) -> bool:
        try:
            return self.info(url).get("type") == "file"
        except FileNotFoundError:
            return False

    # -------------------------------------------------------------- listing

    def find(self, url: str) -> dict[str, int]:
        """{url: size} of every object under the prefix ``url``, in name order, from the store's
        paginated listing (no object is read)."""
        return {name: info.size for name, info in self.find_objects(url).items()}

    def find_objects(self, url: str) -> dict[str, ObjectInfo]:
        """{url: identity} of every object under the prefix ``url``, in name order, from the same
        paginated listing (no request per object); folder markers are left out."""
        found = self.call(url, lambda: self.fs.find(self.path(url).rstrip("/"), detail=True))
        return self._objects(found)

    def glob(self, pattern: str) -> dict[str, int]:
        """{url: size} of the objects a glob matches, in name order."""
        return {name: info.size for name, info in self.glob_objects(pattern).items()}

    def glob_objects(self, pattern: str) -> dict[str, ObjectInfo]:
        """{url: identity} of the objects a glob matches, in name order."""
        found = self.call(pattern, lambda: self.fs.glob(self.path(pattern), detail=True))
        return self._objects(found)

    def ls_objects(self, prefix: str) -> dict[str, ObjectInfo]:
        """{url: identity} of the objects directly under ``prefix`` (one listing level)."""
        entries = self.call(prefix, lambda: self.fs.ls(self.path(prefix).rstrip("/"), detail=True))
        return self._objects({entry["name"]: entry for entry in entries})

    def _objects(self, found: dict[str, dict[str, Any]]) -> dict[str, ObjectInfo]:
        return {self.to_url(path): identity(self.protocol, entry) for path, entry in sorted(found.items())
                if entry.get("type", "file") == "file" and not _folder_marker(path, entry)}

    # -------------------------------------------------------------- reading

    def pins_reads(self, pin: ObjectInfo) -> bool:
        """Whether reads of ``pin`` carry its version (a condition the store checks); elsewhere
        ``check`` compares it after reading."""
        protocol = self.protocol
        if protocol in ("s3", "s3a"):
            return bool(pin.etag or pin.version)
        if protocol in ("http", "https"):
            return bool((pin.etag and not pin.etag.startswith("W/")) or pin.version)
        if protocol in ("gs", "gcs"):
            return bool(pin.version)
        return protocol in ("az", "abfs", "abfss") and bool(pin.etag)

    def _request(self, url: str, start: int | None, stop: int | None, pin: ObjectInfo | None) -> Any:
        """A factory of the coroutine (async filesystems) or the call that fetches the bytes,
        with the store's condition for ``pin``."""
        fs, path = self.fs, self.path(url)
        protocol = self.protocol if pin is not None else "plain"
        if protocol in ("s3", "s3a"):
            return lambda: _s3_get(fs, path, start, stop, pin)
        if protocol in ("http", "https"):
            return lambda: _http_get(fs, path, start, stop, pin)
        if protocol in ("gs", "gcs") and pin.version:
            return lambda: fs._cat_file(path, start=start, end=stop, generation=pin.version)
        if protocol in ("az", "abfs", "abfss") and pin.etag:
            return lambda: _az_get(fs, path, start, stop, pin)
        if getattr(fs, "async_impl", False):
            return lambda: fs._cat_file(path, start=start, end=stop)
        return lambda: fs.cat_file(path, start=start, end=stop)

    def _get(self, url: str, start: int | None, stop: int | None, pin: ObjectInfo | None) -> bytes:
        """One GET (not retried here), bounded by its deadline; a refused condition, or a pinned
        version gone while the name still exists, is ObjectChanged."""
        nbytes = (stop - start) if start is not None and stop is not None else (pin.size if pin else 0)
        what = url if start is None else f"{url} bytes {start}-{stop - 1}"
        try:
            return self._bounded(nbytes, self._request(url, start, stop, pin), what)
        except Exception as error:
            if pin is not None and (_precondition_failed(error) or isinstance(error, FileNotFoundError)
                                    or _status(error) == 404):
                changed = self.changed(url, pin, error)
                if changed is not None:
                    raise changed from None
            raise

    def changed(self, url: str, pin: ObjectInfo, error: BaseException | None = None) -> ObjectChanged | None:
        """The ObjectChanged of ``url`` where a fresh HEAD finds another version than ``pin`` (or
        none, after a refused condition), else None."""
        try:
            now = self.object_info(url, fresh=True)
        except FileNotFoundError:
            if error is not None and not _precondition_failed(error):
                return None  # gone: the read's own FileNotFoundError says so
            return ObjectChanged(url, pin, None)
        if now.same(pin) and (error is None or not _precondition_failed(error)):
            return None
        return ObjectChanged(url, pin, now)

    def check(self, url: str, pin: ObjectInfo | None) -> None:
        """Raise ObjectChanged where ``url`` is no longer the version ``pin`` (one fresh HEAD);
        nothing to do (no request) where reads carry the version already."""
        if pin is None or self.pins_reads(pin):
            return
        changed = self.changed(url, pin)
        if changed is not None:
            raise changed

    def read_range(self, url: str, start: int, stop: int, pin: ObjectInfo | None = None) -> bytes:
        """Bytes ``start`` to ``stop`` (exclusive) of an object, in one ranged GET (retried),
        of the version ``pin`` where given."""
        if stop <= start:
            return b""

        def get() -> bytes:
            REQUESTS.add("get")
            data = self._get(url, start, stop, pin)
            if len(data) != stop - start:  # a body cut short without an error
                raise ConnectionError(f"the response ended after {len(data)} of {stop - start} bytes")
            return data
        return self.call(f"{url} bytes {start}-{stop - 1}", get)

    def read(self, url: str, pin: ObjectInfo | None = None) -> bytes:
        """A whole (small) object in one GET, retried, of the version ``pin`` where given."""
        def get() -> bytes:
            REQUESTS.add("get")
            data = self._get(url, None, None, pin)
            if pin is not None and len(data) != pin.size:
                raise ConnectionError(f"the response ended after {len(data)} of {pin.size} bytes")
            return data
        return self.call(url, get)

    def read_many(self, urls: list[str], pins: dict[str, ObjectInfo] | None = None
                  ) -> dict[str, bytes | OSError]:
        """Whole objects fetched concurrently (one batch of requests, each bounded by its
        deadline and pinned to ``pins[url]`` where given); each that failed for a transient
        fault is tried again on its own, retried; a missing or forbidden one maps to its
        FileNotFoundError or PermissionError, a changed one to ObjectChanged."""
        pins = pins or {}
        for _ in urls:
            REQUESTS.add("get")
        fetched = self._batch(urls, pins)
        out: dict[str, bytes | OSError] = {}
        for url in urls:
            data, pin = fetched.get(url), pins.get(url)
            if isinstance(data, bytes) and (pin is None or len(data) == pin.size):
                out[url] = data
                continue
            if isinstance(data, BaseException) and pin is not None and (
                    _precondition_failed(data) or isinstance(data, FileNotFoundError)):
                changed = self.changed(url, pin, data)
                if changed is not None:
                    out[url] = changed
                    continue
            if isinstance(data, BaseException) and fault_kind(data) is None:
                plain = _plain(data, url)
                out[url] = plain if isinstance(plain, OSError) else OSError(
                    errno.EIO, f"{url}: {type(data).__name__}: {str(data)[:200]}")
                continue
            try:
                out[url] = self.read(url, pin)
            except OSError as error:
                out[url] = error
        return out

    def _batch(self, urls: list[str], pins: dict[str, ObjectInfo]) -> dict[str, Any]:
        """{url: bytes or the exception} of one concurrent batch of GETs."""
        fs = self.fs
        if not urls:
            return {}
        if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            from fsspec.asyn import sync

            async def one(url: str) -> Any:
                pin = pins.get(url)
                try:
                    return await _within(self._request(url, None, None, pin),
                                         self.deadline(pin.size if pin else 0), url)
                except Exception as error:  # sorted by the caller
                    return error

            async def every() -> list[Any]:
                return await asyncio.gather(*(one(url) for url in urls))
            try:
                return dict(zip(urls, sync(fs.loop, every)))
            except Exception:  # the whole batch failed: each is fetched on its own, retried
                return {}
        out: dict[str, Any] = {}
        for url in urls:
            try:
                out[url] = self._get(url, None, None, pins.get(url))
            except Exception as error:  # sorted by the caller
                out[url] = error
        return out

    def open(self, url: str, size: int | None = None, block_size: int | None = None,
             pin: ObjectInfo | None = None) -> RangedReader:
        """``url`` for sequential reading in large ranged GETs, each of the version ``pin``
        where given (its size found by one HEAD where neither is given: a missing or forbidden
        object raises here)."""
        if size is None:
            size = pin.size if pin is not None else self.size(url)
        return RangedReader(self, url, size, block_size or self.block_size, pin)


async def _within(request: Callable[[], Any], seconds: float, what: str) -> Any:
    """The coroutine ``request()`` makes, cancelled (its connection closed) after ``seconds``."""
    task = asyncio.ensure_future(request())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise RequestDeadline(errno.ETIMEDOUT, f"{what}: no complete answer within {seconds:.0f} s "
                              "(data.storage_options request_timeout_s and min_rate)")
    return task.result()


def _in_thread(request: Callable[[], Any], seconds: float, what: str) -> Any:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((True, request()))
        except BaseException as error:  # handed to the caller's thread
            result.append((False, error))
    worker = threading.Thread(target=run, daemon=True, name="store-request")
    worker.start()
    worker.join(seconds)
    if not result:
        raise RequestDeadline(errno.ETIMEDOUT, f"{what}: no complete answer within {seconds:.0f} s "
                              "(data.storage_options request_timeout_s and min_rate)")
    ok, value = result[0]
    if not ok:
        raise value
    return value


async def _s3_get(fs: Any, path: str, start: int | None, stop: int | None, pin: ObjectInfo | None) -> bytes:
    """A GET of an S3 object (a range of it), If-Match its listed ETag and of its listed VersionId."""
    bucket, key, version = fs.split_path(path)
    kwargs: dict[str, Any] = {}
    if start is not None:
        kwargs["Range"] = f"bytes={start}-{stop - 1}"
    if pin is not None and pin.etag:
        kwargs["IfMatch"] = pin.etag
    if (pin is not None and pin.version) or version:
        kwargs["VersionId"] = (pin.version if pin is not None and pin.version else version)
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)
    body = response["Body"]
    try:
        return await body.read()
    finally:
        body.close()


async def _http_get(fs: Any, url: str, start: int | None, stop: int | None, pin: ObjectInfo | None) -> bytes:
    """A GET with If-Match the listed ETag (a weak one never matches: If-Unmodified-Since the
    listed Last-Modified then), the filesystem's own headers kept."""
    headers = dict(fs.kwargs.get("headers") or {})
    if pin is not None and pin.etag and not pin.etag.startswith("W/"):
        headers["If-Match"] = pin.etag
    elif pin is not None and pin.version:
        headers["If-Unmodified-Since"] = pin.version
    return await fs._cat_file(url, start=start, end=stop, headers=headers)


async def _az_get(fs: Any, path: str, start: int | None, stop: int | None, pin: ObjectInfo) -> bytes:
    """A blob download with the listed ETag as its condition (adlfs's own read passes none)."""
    from azure.core import MatchConditions

    container, blob, version_id = fs.split_path(path)
    length = None if stop is None else stop - (start or 0)
    async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
        stream = await client.download_blob(offset=start if stop is not None else None, length=length,
                                            version_id=pin.version or version_id, etag=pin.etag,
                                            match_condition=MatchConditions.IfNotModified)
        return await stream.readall()


class MissingClient(UserError, ImportError):
    """A URL whose store's client is not installed; the message names the extra."""


def _missing_client(protocol: str) -> MissingClient:
    extra = EXTRAS.get(protocol)
    hint = (f"pip install 'batch-classify[{extra}]'" if extra else
            "install the fsspec filesystem for this scheme")
    return MissingClient(f"{protocol}:// URLs need the store's client: {hint}")


def store_for(url: str, options: dict[str, Any] | None = None) -> Store:
    return Store(url, dict(options or {}))


class SeekableObject(io.RawIOBase):
    """An object of ``size`` bytes read at ``position``: what RangedReader and the Parquet reader's
    ranges share (seeks move the position; the subclass's ``read`` fetches)."""

    size: int
    position: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)


class RangedReader(SeekableObject):
    """An object read front to back in ranged GETs of ``block_size`` bytes (one block held in
    memory); seeks within the block held are free. A GET that fails part-way is tried again
    from the byte reached, so nothing before it is read twice."""

    def __init__(self, store: Store, url: str, size: int, block_size: int,
                 pin: ObjectInfo | None = None) -> None:
        super().__init__()
        self.store, self.url, self.size, self.block_size = store, url, size, block_size
        self.pin = pin
        self.position = 0
        self.block_start = 0
        self.block = b""
        self.gets = 0

    def _fill(self) -> None:
        held = self.block_start <= self.position < self.block_start + len(self.block)
        if not held:
            stop = min(self.size, self.position + self.block_size)
            self.block = self.store.read_range(self.url, self.position, stop, self.pin)
            self.block_start = self.position
            self.gets += 1

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self.position
        parts, wanted = [], min(size, max(0, self.size - self.position))
        while wanted > 0:
            self._fill()
            start = self.position - self.block_start
            piece = self.block[start:start + wanted]
            parts.append(piece)
            self.position += len(piece)
            wanted -= len(piece)
        return b"".join(parts)


# ------------------------------------------------------------------ conditional writes
#
# Writes tied to an object's version: created only if absent, replaced or deleted only at the
# version seen (S3: If-None-Match / If-Match with the ETag; GCS: ifGenerationMatch; Azure:
# If-Match with the ETag). Stores without them (hf://, https://, local) say so through
# ``conditional_writes``, and their callers fall back to detecting what they cannot prevent.

CONDITIONAL_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
"""Schemes whose client can replace or delete an object only at a given version."""


class VersionChanged(OSError):
    """A conditional write or delete refused (HTTP 412): the object is not at the version named,
    or is gone."""


def conditional_writes(store: Store) -> bool:
    """Whether the store replaces and deletes only at a version named (else: detect, not prevent)."""
    return store.protocol in CONDITIONAL_SCHEMES


def _unquoted(tag: Any) -> str | None:
    return None if tag in (None, "") else str(tag).strip('"')


def version_tag(info: dict[str, Any]) -> str | None:
    """The version of an object as its store names it (S3 and Azure: ETag; GCS: generation)."""
    for key in ("generation", "ETag", "etag"):
        if info.get(key) not in (None, ""):
            return _unquoted(info[key])
    return None


def content_md5(info: dict[str, Any]) -> str | None:
    """The MD5 (hex) of an object's bytes where its listing or HEAD gives it: S3's ETag of a
    single-part upload (a multipart one has a ``-``), GCS's md5Hash, Azure's content_md5."""
    import base64
    import binascii

    etag = _unquoted(info.get("ETag"))
    if etag and re.fullmatch(r"[0-9a-f]{32}", etag):
        return etag
    if info.get("md5Hash"):
        try:
            return base64.b64decode(info["md5Hash"]).hex()
        except (binascii.Error, ValueError):
            return None
    settings = info.get("content_settings") or {}
    md5 = settings.get("content_md5") if hasattr(settings, "get") else None  # azure's: a dict-like
    return bytes(md5).hex() if md5 else None


def _forget(store: Store, path: str) -> None:
    """Drop what the client's listing cache holds for ``path`` (a write or a refusal changed it)."""
    invalidate = getattr(store.fs, "invalidate_cache", None)
    if invalidate is not None:
        invalidate(path)


def _precondition(error: BaseException) -> bool:
    """Whether ``error`` is a store's refusal of a conditional request (HTTP 412, any client)."""
    text = f"{type(error).__name__} {error}".lower()
    status = getattr(error, "status", None) or getattr(error, "status_code", None)
    return (status == 412 or "resourcemodified" in text or "precondition" in text or "pre-condition" in text
            or "conditionnotmet" in text or "condition not met" in text)


def fresh_info(store: Store, url: str) -> dict[str, Any] | None:
    """An object's details from a request made now (a HEAD), never from the client's listing
    cache (which answers for an object written or refused a moment ago); None where absent."""
    path = store.path(url)

    def head() -> dict[str, Any]:
        REQUESTS.add("head")
        _forget(store, path)
        if store.protocol in ("s3", "s3a"):  # HEAD alone (s3fs lists the prefix after a 404)
            bucket, key, _ = store.fs.split_path(path)
            try:
                out = store.fs.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                raise
            except OSError as error:
                if "not found" in str(error).lower() or "404" in str(error):
                    raise FileNotFoundError(errno.ENOENT, f"{url}: no such object") from error
                raise
            return {"ETag": out.get("ETag"), "size": out["ContentLength"], "name": path, "type": "file"}
        try:
            return store.fs.info(path, refresh=True)
        except TypeError:  # a client without the refresh keyword (it has no listing cache to skip)
            return store.fs.info(path)

    try:
        info = store.call(url, head)
    except FileNotFoundError:
        return None
    return info if info.get("type", "file") == "file" else None


def find_versions(store: Store, url: str) -> dict[str, dict[str, Any]]:
    """{url: {"size", "tag", "md5"}} of every object under the prefix ``url``, from one listing."""
    def listing() -> dict[str, Any]:
        REQUESTS.add("list")
        return store.fs.find(store.path(url).rstrip("/"), detail=True)

    found = store.call(url, listing)
    return {store.to_url(path): {"size": int(entry.get("size") or 0), "tag": version_tag(entry),
                                 "md5": content_md5(entry)}
            for path, entry in sorted(found.items()) if entry.get("type", "file") == "file"}


def _refused(what: str, error: BaseException) -> VersionChanged:
    why = "it is gone" if isinstance(error, FileNotFoundError) else "412 Precondition Failed"
    return VersionChanged(errno.EEXIST, f"{what}: refused, the object is not at the version seen ({why})")


def put_if_absent(store: Store, url: str, data: bytes) -> str | None:
    """One PUT of ``data`` that creates ``url`` only if absent (FileExistsError where present);
    returns the new object's version where the store says it in its answer."""
    path = store.path(url)

    def put() -> Any:
        REQUESTS.add("put")
        if store.protocol in ("s3", "s3a"):
            bucket, key, _ = store.fs.split_path(path)
            try:
                return store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except OSError as error:
                if _precondition(error) or isinstance(error, FileExistsError):
                    raise FileExistsError(errno.EEXIST, f"{url}: exists") from error
                raise
            finally:
                _forget(store, path)
        return store.fs.pipe_file(path, data, mode="create")

    answer = store.call(url, put)
    return _answer_tag(answer)


def put_if_match(store: Store, url: str, data: bytes, tag: str) -> str | None:
    """One PUT of ``data`` that replaces ``url`` only at version ``tag`` (VersionChanged where it
    is at another, or gone); returns the new version where the store says it."""
    path = store.path(url)

    def put() -> Any:
        REQUESTS.add("put")
        try:
            return _replace(store, path, data, tag)
        except FileNotFoundError as error:  # gone since: not the version named either
            raise _refused(url, error) from error
        except Exception as error:  # each client has its own 412 (azure's is no OSError)
            if _precondition(error) or isinstance(error, FileExistsError):
                raise _refused(url, error) from error
            raise
        finally:
            _forget(store, path)

    return _answer_tag(store.call(url, put))


def delete_if_match(store: Store, url: str, tag: str) -> None:
    """Delete ``url`` only at version ``tag`` (VersionChanged where it is at another); an object
    already gone is no error."""
    path = store.path(url)

    def delete() -> None:
        REQUESTS.add("delete")
        try:
            _delete(store, path, tag)
        except FileNotFoundError:
            return
        except Exception as error:  # each client has its own 412 (azure's is no OSError)
            if _precondition(error) or isinstance(error, FileExistsError):
                _forget(store, path)
                if fresh_info(store, url) is None:  # Azure answers If-Match on a missing blob with 412
                    return
                raise _refused(url, error) from error
            raise
        finally:
            _forget(store, path)

    store.call(url, delete)


def _answer_tag(answer: Any) -> str | None:
    if isinstance(answer, dict):
        return version_tag(answer)
    return None


def _replace(store: Store, path: str, data: bytes, tag: str) -> Any:
    fs = store.fs
    if store.protocol in ("s3", "s3a"):
        bucket, key, _ = fs.split_path(path)
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=f'"{tag}"')
    if store.protocol in ("gs", "gcs"):  # gcsfs's own single-request upload, with the generation
        import json
        from urllib.parse import quote

        bucket, key, _ = fs.split_path(path)
        head = (f'--==0==\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({"name": key})}'
                "\n--==0==\nContent-Type: application/octet-stream\n\n")
        upload = f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o"
        return fs.call("POST", upload, uploadType="multipart",
                       headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True,
                       data=head.encode() + data + b"\n--==0==--", ifGenerationMatch=str(tag))
    if store.protocol in ("az", "abfs", "abfss"):
        from azure.core import MatchConditions

        return fs.pipe_file(path, data, overwrite=True, etag=f'"{tag}"',
                            match_condition=MatchConditions.IfNotModified)
    raise NotImplementedError(f"{store.protocol}:// has no conditional replace")


def _delete(store: Store, path: str, tag: str) -> None:
    fs = store.fs
    if store.protocol in ("s3", "s3a"):
        bucket, key, _ = fs.split_path(path)
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{tag}"')
        return
    if store.protocol in ("gs", "gcs"):
        bucket, key, _ = fs.split_path(path)
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(tag))
        return
    if store.protocol in ("az", "abfs", "abfss"):
        from azure.core import MatchConditions
        from fsspec.asyn import sync

        container, blob, _ = fs.split_path(path)

        async def remove() -> None:
            async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
                await client.delete_blob(etag=f'"{tag}"', match_condition=MatchConditions.IfNotModified)

        sync(fs.loop, remove)
        return
    raise NotImplementedError(f"{store.protocol}:// has no conditional delete")


# ------------------------------------------------------------------ mistakes, named with their side

FSSPEC_OPTIONS = ("skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths")
"""Options every fsspec filesystem takes (its instance and listings caches)."""


class StoreMistake(UserError, ValueError):
    """A store named or opened wrongly (an unknown scheme or option), or a store that refuses the
    job (a missing bucket, no access, unreachable): one line naming the setting, the store and
    its side (input or output)."""


def _side(what: str) -> str:
    return "output" if what.startswith("output") else "input"


def _suggest(name: str, known: Any, cutoff: float = 0.6, suffix: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}{suffix}?" if close else ""


def check_scheme(url: str, what: str) -> None:
    """Refuse a URL whose scheme no fsspec filesystem handles (``s4://``), naming a close one."""
    protocol = scheme(url)
    if protocol is None:
        return
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # no fsspec: the store's client is missing, and says so when opened
        return
    known = set(known_implementations) | set(registry)
    if protocol not in known:
        from batch_classify.core.secrets import redact_url

        raise StoreMistake(
            f"{what} {redact_url(url)}: {protocol}:// is no store scheme ({_side(what)} store)"
            f"{_suggest(protocol, known, 0.5, '://')} (stores: s3://, gs://, az://, hf://, https://; a "
            "local path has no scheme)")


def _parameters(function: Any) -> set[str]:
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return set()
    return {p.name for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "cls")}


def _known_options(protocol: str) -> tuple[set[str], dict[str, set[str]]] | None:
    """(the options a scheme's filesystem takes, {option: the keys it takes} for nested ones), or
    None where its client is not installed (the store says so when it is opened)."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return None
    known = {name for klass in cls.__mro__ if "__init__" in klass.__dict__
             for name in _parameters(klass.__dict__["__init__"])}
    known |= {*FSSPEC_OPTIONS, *OWN_OPTIONS}
    nested: dict[str, set[str]] = {}
    if protocol in ("s3", "s3a"):
        import aiobotocore.session
        import botocore.config
        import botocore.session

        known |= _parameters(aiobotocore.session.AioSession.__init__)  # s3fs passes the rest to it
        nested["config_kwargs"] = set(botocore.config.Config.OPTION_DEFAULTS)
        nested["client_kwargs"] = _parameters(botocore.session.Session.create_client) - {"service_name"}
    elif protocol in ("http", "https"):
        import aiohttp

        # fsspec sends the options it does not take itself with each request
        known |= _parameters(aiohttp.ClientSession._request) - {"method", "str_or_url"}
        nested["client_kwargs"] = _parameters(aiohttp.ClientSession.__init__)
    return known, nested


def check_options(url: str, options: dict[str, Any] | None, what: str) -> None:
    """Refuse an option the store's filesystem does not take (``endpont_url``; for S3 also inside
    config_kwargs and client_kwargs), naming it and the closest option, before anything runs.
    ``what``: the setting, ``data.storage_options`` or ``output.storage_options``."""
    protocol = scheme(url)
    if protocol is None or not options:
        return
    if not isinstance(options, dict):
        raise StoreMistake(f"{what}: a mapping of options is needed ({_side(what)} store {protocol}://)")
    found = _known_options(protocol)
    if found is None:
        return
    known, nested = found
    for key, value in options.items():
        if key not in known:
            raise StoreMistake(f"{what}.{key}: not an option of {protocol}:// stores ({_side(what)} store)"
                               f"{_suggest(key, known)}")
        if key in nested and isinstance(value, dict):
            for inner in value:
                if inner not in nested[key]:
                    raise StoreMistake(f"{what}.{key}.{inner}: not an option of {protocol}:// stores' "
                                       f"{key} ({_side(what)} store){_suggest(inner, nested[key])}")


_MISSING_BUCKET = ("nosuchbucket", "bucket does not exist", "containernotfound",
                   "specified container does not exist", "bucket_not_found", "no such bucket",
                   "repositorynotfound", "repository not found")
_BUCKET_WORD = {"az": "container", "abfs": "container", "abfss": "container", "adl": "container",
                "hf": "repository"}
"""What a store calls the top level of its names (S3 and GCS: a bucket)."""
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+?(?=[\s'\":;,)]|$)")


def bucket_of(url: str) -> str:
    """``scheme://bucket`` of a URL (its bucket, container, repository or host)."""
    protocol = scheme(url) or "file"
    rest = url.split("://", 1)[1] if "://" in url else url
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if protocol == "hf":  # hf://datasets/owner/name
        host = "/".join(rest.split("/")[:3])
    return f"{protocol}://{host}"


def problem_of(error: BaseException) -> str | None:
    """What a store's refusal means, from the error and its causes: a missing bucket, no access,
    an unreachable store; None where it is none of these."""
    chain = _chain(error)
    text = " ".join(f"{type(e).__name__} {e}" for e in chain).lower()
    if any(word in text for word in _MISSING_BUCKET):
        return "missing bucket"
    if any(isinstance(e, PermissionError) for e in chain) or "accessdenied" in text or "(403)" in text:
        return "access denied"
    if isinstance(error, StoreError) or any(isinstance(e, StoreError) for e in chain):
        return "unreachable"
    return None


def side_mistake(error: BaseException, sides: dict[str, str | None]) -> StoreMistake | None:
    """A store's refusal (``problem_of``) as one line naming the store and its side, or None.
    ``sides``: {"data.path": its URL, "output.dir": its URL}; the side is the one whose store the
    URL in the error's message is in (the output's where both are the same bucket and it is under
    output.dir)."""
    problem = problem_of(error)
    if problem is None:
        return None
    from batch_classify.core.secrets import redact_text, redact_url

    urls = [u for e in _chain(error) for u in _URL_IN_TEXT.findall(str(e))]
    chosen = None
    for key in ("output.dir", "data.path"):  # the output first: it may lie in the input's bucket
        root = sides.get(key)
        if root and is_url(root) and any(u.startswith(root.rstrip("/")) for u in urls):
            chosen = key
            break
    if chosen is None:
        chosen = next((key for key in ("data.path", "output.dir") if sides.get(key) and is_url(sides[key])
                       and any(bucket_of(u) == bucket_of(sides[key]) for u in urls)), None)
    if chosen is None:
        return None
    configured = str(sides[chosen])
    side, bucket = ("output" if chosen == "output.dir" else "input"), bucket_of(configured)
    options = "output.storage_options" if side == "output" else "data.storage_options"
    where = f"({side} store {bucket})"
    url = urls[0] if urls else configured
    if problem == "missing bucket":
        word = _BUCKET_WORD.get(scheme(configured) or "", "bucket")
        said = (f"the {word} {bucket.split('://', 1)[1]} does not exist {where}; "
                + ("create it, or " if side == "output" else "")
                + f"check {chosen} and {options}.endpoint_url")
    elif problem == "access denied":
        said = (f"access denied (403) to {url} {where}; check the credentials (the store's environment "
                f"variables and files, or {options})")
    else:
        reason = next((str(e) for e in _chain(error) if isinstance(e, StoreError)), str(error))
        said = (f"the store could not be reached or kept failing {where}: {reason}; check {options}."
                "endpoint_url and the network, then run the same command again")
    if side == "output":
        said += "; units committed so far are kept in the staging folder"
    return StoreMistake(redact_text(f"{chosen} {redact_url(configured)}: {said}"))
