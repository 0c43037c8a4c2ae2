"""A job started in the background, in its own process group, for tests that signal or kill it
while it runs."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import ROOT, job_command


class Background:
    """A job in its own process group, its output lines collected on a thread."""

    def __init__(self, args: list[str], processes: int):
        self.process = subprocess.Popen(
            job_command(args, processes), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, "job ended early:\n" + "".join(self.log)
                continue
            self.log.append(line)
            if text in line:
                return
        raise AssertionError(f"no line with {text!r}:\n" + "".join(self.log))

    def wait_for_units(self, folder: Path, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(list((folder / "predictions").glob("unit-*.parquet"))) < count:
            assert self.process.poll() is None, "job ended early"
            assert time.monotonic() < deadline, "units never committed"
            time.sleep(0.2)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
