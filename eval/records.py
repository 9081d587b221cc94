"""Append-only per-example JSONL records: flushed and fsynced per line, tolerant of a torn last line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load_records(path: Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Records by example id. A torn final line (a crash mid-write) is ignored, and cut off with ``repair``."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    with path.open("rb") as fh:
        data = fh.read()
    pos = 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        line = raw.strip()
        if not line:
            good_bytes = pos
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if pos == len(data):  # torn tail
                break
            raise ValueError(
                f"{path}: corrupt record line at byte {pos - len(raw)}; delete that line or the file to rerun"
            ) from None
        if not raw.endswith(b"\n"):
            break
        out[rec["id"]] = rec
        good_bytes = pos
    if repair and good_bytes < len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_bytes)
    return out


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a single JSON line and make it durable before returning."""
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed indentation, trailing newline) via a temp file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
