"""Small text and file helpers every stage shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batch_classify.core.faults import replacing


def percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100.0 * value:.2f}%"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with replacing(path, temporary):  # a full disk: no half-written file left beside the old one
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
