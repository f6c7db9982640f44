"""JSON writer: one record per image, keys in schema order, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from boneage.atomic import write_text


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    """Write ``record`` as indented UTF-8 JSON (temp file + rename)."""
    return write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
