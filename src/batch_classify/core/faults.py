"""Filesystem faults told apart from bugs: the output filesystem failing (full, over quota,
read-only, no permission, a folder that cannot be created, an I/O error), and reads of the
input that fail for a moment (EIO, ESTALE, a timeout or a reset connection on a network mount).

A fault of the output filesystem ends the job with one line, printed once by the main rank,
and a status of its own: 74 (EX_IOERR in sysexits.h) where the filesystem ran out of room or
failed, so that running the same command again later finishes the job; 2, as for any
configuration mistake, where output.dir cannot be written at all (read-only, no permission,
cannot be created). Every stage uses this module, so it sits at the bottom and imports
nothing of the project but the error base class.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch_classify.core.errors import describe_error

OUTPUT_FAULT_EXIT_STATUS = 74
"""EX_IOERR: the output filesystem is full, over quota or failed; committed units are safe.
Free space and run the same command again (a Slurm script must not requeue it as it is)."""
NOT_WRITABLE_EXIT_STATUS = 2
"""output.dir cannot be written at all: the same status as any configuration mistake."""

STATUS_FILE_VARIABLE = "BATCH_CLASSIFY_STATUS_FILE"
"""Where a rank leaves its exit status for a launcher script: torchrun reports any failed rank
as 1, so slurm/launch-node.sh reads the job's own status from here."""

FULL = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EFBIG: "refusing a file that large"}
READ_ONLY = {errno.EROFS}
DENIED = {errno.EACCES, errno.EPERM}
UNCREATABLE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
FAILED = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EREMOTEIO, errno.ENOLINK,
          errno.ECOMM}
"""Errors of a filesystem that is failing rather than full: a lost disk, an evicted Lustre or
NFS client. Named only where the failing path is the output's (an input read is not)."""

TRANSIENT = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
             errno.ECONNABORTED, errno.ECONNREFUSED, errno.ENETRESET, errno.ENETUNREACH,
             errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENOTCONN, errno.EREMOTEIO, errno.ENOLINK,
             errno.ECOMM, errno.EPIPE}
"""Errors of a read that may work a moment later: a network mount's blip, a stale handle, a
disk controller's retryable error. A missing file, a permission or a broken image is not."""

TRANSIENT_MARK = " (transient)"
"""Appended to the type of an error row whose read failed with a transient error after its
retries, e.g. ``OSError (transient): [Errno 5] Input/output error ...``: errors_by_type counts
it apart, and ``runtime.retry_errors transient`` classifies it again on a rerun. An error row
without the mark is permanent (the file is broken, missing or refused by a limit)."""


def is_transient(error: BaseException) -> bool:
    """Whether a read that raised ``error`` may succeed if tried again."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT


def is_transient_message(message: str | None) -> bool:
    """Whether an error row's text says its read failed for a transient reason."""
    return message is not None and message.split(":", 1)[0].endswith(TRANSIENT_MARK)


def describe_read_error(error: BaseException, attempts: int = 1, seconds: float = 0.0) -> str:
    """The error column of an item: ``Type: message``, the type marked transient where the read
    failed for a transient reason (then with how often it was tried)."""
    text = describe_error(error)
    if not is_transient(error):
        return text
    kind, _, message = text.partition(":")
    tries = f" ({attempts} reads over {seconds:.1f} s)" if attempts > 1 else ""
    return f"{kind}{TRANSIENT_MARK}:{message}{tries}"[:500]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    return _size(float(n))


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` or its nearest ancestor that exists (a folder not yet created has no filesystem)."""
    current = Path(os.path.abspath(os.fspath(path)))
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would hold it)."""
    current = existing_ancestor(path)
    try:
        device = current.stat().st_dev
        while current != current.parent and current.parent.stat().st_dev == device:
            current = current.parent
    except OSError:
        pass
    return current


def free_space(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bytes free to this user, bytes in all) on the filesystem of ``path``; None if unknown."""
    try:
        stat = os.statvfs(existing_ancestor(path))
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _creates(path: str, folder: str) -> bool:
    """Whether making ``folder`` means making ``path`` (one of its missing ancestors)."""
    return _within(folder, path) and not os.path.exists(path)


class OutputFault(OSError):
    """The output filesystem failed: full, over quota, read-only, no permission, a folder that
    cannot be created, an I/O error. Not a bug, and not the data's fault: one line per job."""

    def __init__(self, what: str, fix: str, exit_status: int = OUTPUT_FAULT_EXIT_STATUS,
                 path: str | None = None, main_rank: bool = True):
        super().__init__(what)
        self.what = what
        """What happened and where, e.g. 'the output filesystem is full (...) at <path>'."""
        self.fix = fix
        """What to do, e.g. 'free space and run the same command again'."""
        self.exit_status = exit_status
        self.path = path
        self.main_rank = main_rank
        """Whether this process prints the job's line (the other ranks exit with its status, quietly)."""

    def __str__(self) -> str:
        return f"{self.what}; {self.fix}"

    def line(self, safe: str | None = None) -> str:
        """The job's one line, with what is safe (the committed units) where known."""
        return "; ".join(part for part in (self.what, safe, self.fix) if part)

    def detail(self) -> dict[str, Any]:
        """What other ranks need to say the same line (through the rendezvous store)."""
        return {"what": self.what, "fix": self.fix, "exit_status": self.exit_status, "path": self.path}

    @classmethod
    def from_detail(cls, detail: dict[str, Any], main_rank: bool) -> OutputFault:
        return cls(str(detail["what"]), str(detail["fix"]), int(detail["exit_status"]),
                   detail.get("path"), main_rank)


def reported_fault(detail: dict[str, Any] | None, main_rank: bool) -> OutputFault | None:
    """The fault another rank published (``JobBoard.fault``), as this rank's, or None."""
    return None if not detail else OutputFault.from_detail(detail, main_rank)


def _reason(error: OSError, path: str | None, output_dir: str, room: bool = False) -> str:
    """'(ENOSPC: No space left on device, at <path>; filesystem /x: 0 B free of 1.0 GiB)'."""
    name = errno.errorcode.get(error.errno, str(error.errno))
    text = f"{name}: {os.strerror(error.errno)}"
    if path is not None and os.path.abspath(path) != os.path.abspath(output_dir):
        text += f", at {path}"
    if room:
        found = free_space(path or output_dir)
        if found is not None:
            text += (f"; filesystem {mount_point(path or output_dir)}: {human_size(found[0])} free of "
                     f"{human_size(found[1])}")
    return f"({text})"


def output_fault(error: BaseException, output_dir: str | os.PathLike) -> OutputFault | None:
    """``error`` as a fault of the output filesystem, or None where it is something else (a bug,
    an unreadable input). Full and read-only are always the output's (the job writes nowhere
    else that matters); no permission, a missing parent and I/O errors only where the path is
    under output.dir, or one of its folders the job was creating."""
    if isinstance(error, OutputFault):
        return error
    if not isinstance(error, OSError) or error.errno is None:
        return None
    if error.filename is None and "://" in str(error):  # a request to an object store, not a filesystem
        return None
    output = os.fspath(output_dir)
    path = error.filename if isinstance(error.filename, (str, bytes, os.PathLike)) else None
    path = os.fsdecode(path) if path is not None else None
    ours = path is None or _within(path, output) or _creates(path, output)
    code = error.errno
    if code in FULL:
        return OutputFault(
            f"the output filesystem is {FULL[code]} {_reason(error, path, output, room=True)}",
            "free space (or raise the quota) and run the same command again: it finishes the "
            "units that are missing", OUTPUT_FAULT_EXIT_STATUS, path)
    if code in READ_ONLY:
        return OutputFault(
            f"output.dir {output} is on a read-only filesystem {_reason(error, path, output)}",
            "choose an output.dir on a writable filesystem (or remount it read-write) and run the "
            "same command again", NOT_WRITABLE_EXIT_STATUS, path)
    if not ours or path is None and code not in FAILED:
        return None
    if code in DENIED:
        return OutputFault(
            f"no permission to write output.dir {output} {_reason(error, path, output)}",
            "choose an output.dir you may write (or fix its permissions) and run the same command "
            "again", NOT_WRITABLE_EXIT_STATUS, path)
    if code in UNCREATABLE and path is not None and _creates(path, output):
        return OutputFault(
            f"output.dir {output} cannot be created {_reason(error, path, output)}",
            "check the path (a part of it may be a file, or a mount that is missing), or choose "
            "another output.dir, and run the same command again", NOT_WRITABLE_EXIT_STATUS, path)
    if code in FAILED:
        return OutputFault(
            f"the output filesystem failed {_reason(error, path, output)}",
            f"once it is healthy again, check it with `batch-classify verify {output}` and run the "
            "same command again: it finishes the units that are missing", OUTPUT_FAULT_EXIT_STATUS, path)
    return None


def with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` naming ``path`` where it names no file (pyarrow's and a plain write's do not)."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, error.strerror or str(error), os.fspath(path))


def leave_status(status: int) -> None:
    """Write this rank's exit status where ``$BATCH_CLASSIFY_STATUS_FILE`` says, unless a rank
    wrote one already: the first rank to stop the job names its cause (a disk-full rank, not
    the peers the launcher stopped after it). Best effort: a launcher script reads it."""
    target = os.environ.get(STATUS_FILE_VARIABLE)
    if not target or not status:
        return
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{status}\n")


@contextlib.contextmanager
def replacing(final: Path, temporary: Path, named: Path | None = None) -> Iterator[None]:
    """Write ``temporary`` inside the block; it then replaces ``final`` by a rename. On an
    OSError (a full or failing disk) no temporary file stays and the error names ``named``
    (default ``final``)."""
    try:
        yield
        os.replace(temporary, final)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        renamed = with_path(error, named or final)
        if renamed is error:
            raise
        raise renamed from error
