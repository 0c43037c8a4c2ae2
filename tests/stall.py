"""A read that stalls, as on a hung network mount, in the jobs a test starts.

The job opens only regular files (a FIFO is an error row, not a wait), so a test that needs
a rank stuck in a read installs this hook instead: the jobs import it at start-up (as
``sitecustomize``), and while the gate file exists their opening of the named file waits.
A file ``<gate>.waiting`` says a reader got there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HOOK = """
import os
import time

_open = os.open


def _stalling_open(path, flags, *args, **kwargs):
    name, gate = os.environ.get("STALL_NAME"), os.environ.get("STALL_WHILE")
    if name and gate and os.path.basename(os.fsdecode(path)) == name and os.path.exists(gate):
        open(gate + ".waiting", "w").close()
        while os.path.exists(gate):
            time.sleep(0.05)
    return _open(path, flags, *args, **kwargs)


os.open = _stalling_open
"""


class Stall:
    """The gate of a stalled read: it holds while the gate file exists."""

    def __init__(self, gate: Path):
        self.gate = gate

    @property
    def reached(self) -> bool:
        """Whether a reader has been held at the gate."""
        return Path(f"{self.gate}.waiting").exists()

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)


def stall_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Stall:
    """Make the jobs started from now on wait when they open a file called ``name``."""
    hook = tmp_path / "stall-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    gate = tmp_path / "stall-gate"
    gate.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("STALL_NAME", name)
    monkeypatch.setenv("STALL_WHILE", str(gate))
    return Stall(gate)
