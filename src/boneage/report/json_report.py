"""JSON writer: one record per image, keys in schema order, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    """Write ``record`` as indented UTF-8 JSON (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
