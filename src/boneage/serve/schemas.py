"""API response models (the OpenAPI documentation; handlers return plain JSON) and error entries."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, create_model

from boneage.report.fields import SCHEMA
from boneage.report.schema import SCHEMA_VERSION


API = "/api/v1"
MB = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # bytes a request body may carry beyond the file: boundaries and form fields
_MALE = {"M": 1.0, "F": 0.0}
_REPORT_ID = re.compile(r"^[0-9a-f]{32}$")
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to do")


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    bit_depth: int


# What the web API says differently from SCHEMA.md about a field of the record.
API_MEANINGS = {
    "file": "the upload's file name",
    "heatmap": "URL of the Grad-CAM overlay PNG while the report is kept",
    "identifiers": "always null: the web service drops DICOM identifiers",
}
_API_TYPES = {"image": ImageInfo | None}  # typed more closely than the table's plain dict

_record_fields: dict[str, Any] = {
    f.name: (_API_TYPES.get(f.name, f.py_type), Field(description=API_MEANINGS.get(f.name, f.meaning)))
    for f in SCHEMA}
# The ``boneage predict`` JSON record, field for field from the one table (boneage.report.fields).
ReportRecord: type[BaseModel] = create_model(
    "ReportRecord", __doc__=f"The ``boneage predict`` JSON record (schema {SCHEMA_VERSION}, see SCHEMA.md).",
    **_record_fields)


PredictResponse: type[BaseModel] = create_model(
    "PredictResponse", __base__=ReportRecord, __doc__="The record, then the web-only fields.",
    report_id=(str, Field(description="id of the kept report (the last N analyses are kept)")),
    report_html_url=(str, Field()), report_json_url=(str, Field()),
    heatmap_png_base64=(str | None, Field(description="the Grad-CAM overlay as a base64 PNG")))


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    versions: dict[str, str]
    threads: int = Field(description="inference threads (analyses that can run at once)")
    busy: int = Field(description="analyses running or waiting now")


class ModelResponse(BaseModel):
    architectures: list[str]
    models: list[str]
    members: int
    input_size: list[int] = Field(description="square input side in pixels, per member")
    sex_input: list[bool]
    model_mae_months: float | None = Field(description="mean validation MAE of the members (from the checkpoints)")
    member_mae_months: list[float | None]
    tta: bool
    runtime: str
    heatmap: bool
    max_upload_mb: float
    notice: str


def _errors(*codes: int, inline: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for JSON error replies; ``inline`` for routes whose own replies are not JSON
    (FastAPI would file a ``model`` under the route's media type)."""
    if inline:
        schema = ErrorResponse.model_json_schema()
        return {code: {"description": "Error", "content": {"application/json": {"schema": schema}}} for code in codes}
    return {code: {"model": ErrorResponse} for code in codes}
