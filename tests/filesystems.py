"""Real faulty filesystems for the tests: a size-limited tmpfs, a read-only bind mount, and reads
that fail with EIO through an LD_PRELOAD library (faulty_reads.c, compiled here with gcc).

Mounting needs root with CAP_SYS_ADMIN (CI runs as root); where the tests cannot mount, they
skip with the reason. Every mount is undone when its test ends, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SHIM_SOURCE = Path(__file__).parent / "faulty_reads.c"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


class Mounts:
    """The mounts one test made, undone (lazily where busy) by ``undo``."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: str) -> Path:
        """A tmpfs of ``size`` (mount's syntax: 64k, 2m) at ``where``."""
        where.mkdir(parents=True, exist_ok=True)
        done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.points.append(where)
        return where

    def resize(self, where: Path, size: str | int) -> None:
        done = _run("mount", "-o", f"remount,size={size}", str(where))
        assert done.returncode == 0, done.stderr

    def read_only(self, source: Path, where: Path) -> Path:
        """``source`` bound at ``where``, read-only (the source stays writable)."""
        where.mkdir(parents=True, exist_ok=True)
        done = _run("mount", "--bind", str(source), str(where))
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
        self.points.append(where)
        done = _run("mount", "-o", "remount,ro,bind", str(where))
        assert done.returncode == 0, done.stderr
        return where

    def undo(self) -> None:
        for point in reversed(self.points):
            if _run("umount", str(point)).returncode != 0:
                _run("umount", "-l", str(point))
        self.points.clear()


@contextmanager
def mounted() -> Iterator[Mounts]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root (CI runs as root)")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounts = Mounts()
    try:
        yield mounts
    finally:
        mounts.undo()


def used_bytes(where: Path) -> int:
    stat = os.statvfs(where)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def compile_shim(folder: Path) -> Path:
    """faulty_reads.c as a shared library (skips without gcc: .ci/run installs it)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc) to build the LD_PRELOAD library that injects read faults")
    library = folder / "faulty_reads.so"
    done = _run(compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(SHIM_SOURCE), "-ldl")
    assert done.returncode == 0, done.stderr
    return library


def without_capabilities() -> list[str]:
    """A command prefix that runs as root without the capabilities that bypass file permissions,
    so that a folder's mode bits apply (root would otherwise write anywhere)."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv to drop CAP_DAC_OVERRIDE (util-linux)")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
