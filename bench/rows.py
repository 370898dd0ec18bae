"""Resumable benchmark rows: one JSON object per line, keyed by "key", rewritten atomically after every row."""

from __future__ import annotations

import json
from pathlib import Path


def load_rows(raw: Path, fresh: bool = False) -> dict[str, dict]:
    """The finished rows of `raw` by key (none with `fresh`, which deletes the file)."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        raw.unlink(missing_ok=True)
    if not raw.is_file():
        return {}
    return {row["key"]: row for row in map(json.loads, raw.read_text().splitlines())}


def save_rows(raw: Path, done: dict) -> None:
    tmp = raw.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
    tmp.replace(raw)
