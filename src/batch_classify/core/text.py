"""Small text and file helpers every stage shares."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from batch_classify.core.faults import with_path


def percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100.0 * value:.2f}%"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
        temporary.replace(path)
    except OSError as error:  # a full disk: no half-written file left beside the old one
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        named = with_path(error, path)
        if named is error:
            raise
        raise named from error
