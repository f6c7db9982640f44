"""Reports of a bone-age estimate: JSON record (schema in SCHEMA.md), HTML page, batch CSV, console table.

No torch here: records are plain dicts built by ``boneage.inference.batch``.
"""

from boneage.report.console import format_table
from boneage.report.csv_report import write_csv
from boneage.report.html import render_html, write_html
from boneage.report.images import png_bytes, write_png
from boneage.report.json_report import write_json
from boneage.report.schema import DISCLAIMER, FIELDS, REFERENCES, SCHEMA_VERSION, empty_record

__all__ = [
    "DISCLAIMER",
    "FIELDS",
    "REFERENCES",
    "SCHEMA_VERSION",
    "empty_record",
    "format_table",
    "png_bytes",
    "render_html",
    "write_csv",
    "write_html",
    "write_json",
    "write_png",
]
