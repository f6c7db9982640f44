"""API response models (the OpenAPI documentation; handlers return plain JSON) and error entries."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field


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


class ReportRecord(BaseModel):
    """The ``boneage predict`` JSON record (schema 1.2, see SCHEMA.md)."""

    schema_version: str
    file: str = Field(description="the upload's file name")
    error: str | None
    bone_age_months: float | None
    bone_age_text: str | None
    bone_age_interval_months: list[float] | None = Field(
        description="[low, high] conformal prediction interval in months (null: checkpoint without calibration)")
    interval_level: float | None = Field(description="the interval's nominal coverage, e.g. 0.9")
    interval_method: str | None
    bone_age_by_sex_months: dict[str, float] | None = Field(
        description="sex unknown: the estimate for each sex ({'M': .., 'F': ..}); bone_age_months is their mean")
    chronological_age_months: float | None
    chronological_age_text: str | None
    chronological_age_source: str | None = Field(description="'cli' (given in the request) or 'dicom'")
    sex: Literal["M", "F"] | None
    sex_source: str
    difference_months: float | None
    sd_months: float | None
    z_score: float | None
    category: str | None
    category_reason: str | None
    summary: str | None
    normal_range_months: list[float] | None = Field(description="chronological age +/- 2 SD, months")
    category_certainty: str | None = Field(description="what the prediction interval says about the category")
    reference_standard: str
    model_mae_months: float | None
    models: list[str]
    architectures: list[str]
    runtime: str
    tta: bool
    ood_score: float | None = Field(description="feature distance to the training radiographs as a multiple of the "
                                                "refusal threshold (> 1 is refused); null: model without the check")
    ood_method: str | None
    mirrored: bool | None
    image: ImageInfo | None
    heatmap: str | None = Field(description="URL of the Grad-CAM overlay PNG while the report is kept")
    warnings: list[str]
    references: list[str]
    disclaimer: str
    boneage_version: str
    identifiers: dict[str, str] | None = Field(description="always null: the web service drops DICOM identifiers")


class PredictResponse(ReportRecord):
    """The record, then the web-only fields."""

    report_id: str = Field(description="id of the kept report (the last N analyses are kept)")
    report_html_url: str
    report_json_url: str
    heatmap_png_base64: str | None = Field(description="the Grad-CAM overlay as a base64 PNG")


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    versions: dict[str, str]
    workers: int
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
