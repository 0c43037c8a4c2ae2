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
"""

from __future__ import annotations

import collections
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

from batch_classify.core.errors import UserError

log = logging.getLogger(__name__)

BLOCK_SIZE = 32 << 20
"""Bytes per ranged GET of a sequential read (a tar): a 64 MB tar is 2-3 GETs."""
MAX_TRIES = 6
"""Tries of one request in all; the waits between them add up to about 6 s at most."""
BACKOFF_S = 0.2
"""The first wait; each later one doubles, up to MAX_BACKOFF_S, and is drawn at random below it."""
MAX_BACKOFF_S = 4.0
OWN_OPTIONS = ("block_size",)
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


def fault_kind(error: BaseException) -> str | None:
    """The kind of a transient fault (``SlowDown``, ``timeout``, ``connection``, ``server error``),
    or None where retrying cannot help (missing, forbidden, a bad request)."""
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
           for e in chain[:1]):
        return None
    for e in chain:
        status = getattr(e, "status", None) or getattr(e, "code", None)
        text = f"{type(e).__name__} {e}".lower()
        if "slowdown" in text or "slow down" in text or "reduce your request rate" in text:
            return "SlowDown"
        if isinstance(e, TimeoutError) or "timeout" in text or "timed out" in text:
            return "timeout"
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return f"HTTP {status}"
        if isinstance(e, ConnectionError) or any(word in text for word in _TRANSIENT_TEXT):
            return "connection"
    return None


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
        except Exception as error:  # sorted by fault_kind: transient, or raised
            kind = fault_kind(error)
            if kind is None:
                raise _plain(error, what) from error
            if attempt == tries:
                raise StoreError(errno.EIO, f"{what}: still failing after {tries} tries ({kind}: "
                                 f"{type(error).__name__}: {str(error)[:200]})") from error
            wait = random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)))
            RETRIES.note(kind, what, error, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _plain(error: BaseException, what: str) -> BaseException:
    """A missing or forbidden object as the OSError a local file gives, naming the URL."""
    text = f"{type(error).__name__} {error}".lower()
    status = getattr(error, "status", None)
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

    def info(self, url: str) -> dict[str, Any]:
        def head() -> dict[str, Any]:
            REQUESTS.add("info")
            return self.fs.info(self.path(url))
        return self.call(url, head)

    def size(self, url: str) -> int:
        return int(self.info(url)["size"])

    def is_file(self, url: str) -> bool:
        try:
            return self.info(url).get("type") == "file"
        except FileNotFoundError:
            return False

    def find(self, url: str) -> dict[str, int]:
        """{url: size} of every object under the prefix ``url``, in name order, from the store's
        paginated listing (no object is read)."""
        found = self.call(url, lambda: self.fs.find(self.path(url).rstrip("/"), detail=True))
        return {self.to_url(path): int(entry.get("size") or 0)
                for path, entry in sorted(found.items()) if entry.get("type", "file") == "file"}

    def glob(self, pattern: str) -> dict[str, int]:
        """{url: size} of the objects a glob matches, in name order."""
        found = self.call(pattern, lambda: self.fs.glob(self.path(pattern), detail=True))
        return {self.to_url(path): int(entry.get("size") or 0)
                for path, entry in sorted(found.items()) if entry.get("type", "file") == "file"}

    def read_range(self, url: str, start: int, stop: int) -> bytes:
        """Bytes ``start`` to ``stop`` (exclusive) of an object, in one ranged GET (retried)."""
        def get() -> bytes:
            REQUESTS.add("get")
            data = self.fs.cat_file(self.path(url), start=start, end=stop)
            if len(data) != stop - start:  # a body cut short without an error
                raise ConnectionError(f"the response ended after {len(data)} of {stop - start} bytes")
            return data
        return self.call(f"{url} bytes {start}-{stop - 1}", get)

    def read(self, url: str) -> bytes:
        """A whole (small) object in one GET, retried."""
        def get() -> bytes:
            REQUESTS.add("get")
            return self.fs.cat_file(self.path(url))
        return self.call(url, get)

    def read_many(self, urls: list[str]) -> dict[str, bytes | OSError]:
        """Whole objects fetched concurrently (one batch of requests); each that failed for a
        transient fault is tried again on its own, retried; a missing or forbidden one maps to
        its FileNotFoundError or PermissionError."""
        paths = {self.path(url): url for url in urls}
        for _ in urls:
            REQUESTS.add("get")
        try:
            fetched = self.fs.cat(list(paths), on_error="return")
        except Exception:  # the whole batch failed: each is fetched on its own, retried
            fetched = {path: None for path in paths}
        out: dict[str, bytes | OSError] = {}
        for path, url in paths.items():
            data = fetched.get(path) if isinstance(fetched, dict) else None
            if isinstance(data, bytes):
                out[url] = data
                continue
            if isinstance(data, BaseException) and fault_kind(data) is None:
                plain = _plain(data, url)
                out[url] = plain if isinstance(plain, OSError) else OSError(
                    errno.EIO, f"{url}: {type(data).__name__}: {str(data)[:200]}")
                continue
            try:
                out[url] = self.read(url)
            except OSError as error:
                out[url] = error
        return out

    def open(self, url: str, size: int | None = None, block_size: int | None = None) -> RangedReader:
        """``url`` for sequential reading in large ranged GETs (its size found by one HEAD where
        not given: a missing or forbidden object raises here)."""
        if size is None:
            size = self.size(url)
        return RangedReader(self, url, size, block_size or self.block_size)


class MissingClient(UserError, ImportError):
    """A URL whose store's client is not installed; the message names the extra."""


def _missing_client(protocol: str) -> MissingClient:
    extra = EXTRAS.get(protocol)
    hint = (f"pip install 'batch-classify[{extra}]'" if extra else
            "install the fsspec filesystem for this scheme")
    return MissingClient(f"{protocol}:// URLs need the store's client: {hint}")


def store_for(url: str, options: dict[str, Any] | None = None) -> Store:
    return Store(url, dict(options or {}))


class RangedReader(io.RawIOBase):
    """An object read front to back in ranged GETs of ``block_size`` bytes (one block held in
    memory); seeks within the block held are free. A GET that fails part-way is tried again
    from the byte reached, so nothing before it is read twice."""

    def __init__(self, store: Store, url: str, size: int, block_size: int) -> None:
        super().__init__()
        self.store, self.url, self.size, self.block_size = store, url, size, block_size
        self.position = 0
        self.block_start = 0
        self.block = b""
        self.gets = 0

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

    def _fill(self) -> None:
        held = self.block_start <= self.position < self.block_start + len(self.block)
        if not held:
            stop = min(self.size, self.position + self.block_size)
            self.block = self.store.read_range(self.url, self.position, stop)
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

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)
