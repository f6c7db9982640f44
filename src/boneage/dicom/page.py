"""The report page as a picture (``render_page``): what the HTML report shows, drawn with Pillow, for the DICOM
Secondary Capture that a PACS viewer displays next to the radiograph. No browser, no network.

The page holds the result, the research-use notice, the radiograph as analysed and the heatmap; never a patient
identifier or a file name (the Secondary Capture already sits in the patient's study).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from boneage.clinical import format_age
from boneage.report.schema import DISCLAIMER_DETAIL, RUO_NOTICE

WIDTH = 1024
MARGIN = 32
IMAGE_BOX = (464, 560)  # each picture fits in this box (width, height)
MAX_HEIGHT = 2400
_INK, _GREY, _RED, _PALE_RED = (17, 24, 39), (75, 85, 99), (185, 28, 28), (254, 242, 242)
_CATEGORY_COLOURS = {"delayed": (29, 78, 216), "normal": (21, 128, 61), "advanced": (194, 65, 12),
                     "indeterminate": (107, 114, 128)}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> Font:
    """DejaVu Sans where the system has it (it covers every character of the page), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


class _Page:
    """A tall white canvas written top to bottom; ``image()`` crops it to what was drawn."""

    def __init__(self) -> None:
        self.canvas = Image.new("RGB", (WIDTH, MAX_HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.canvas)
        self.y = MARGIN

    def wrap(self, text: str, font: Font, width: int) -> list[str]:
        lines: list[str] = []
        for paragraph in text.split("\n"):
            line = ""
            for word in paragraph.split():
                candidate = f"{line} {word}".strip()
                if line and self.draw.textlength(candidate, font=font) > width:
                    lines.append(line)
                    line = word
                else:
                    line = candidate
            lines.append(line)
        return lines

    def text(self, text: str, size: int = 18, *, bold: bool = False, fill: tuple[int, int, int] = _INK,
             x: int = MARGIN, width: int = WIDTH - 2 * MARGIN, gap: int = 6) -> None:
        font = _font(size, bold)
        for line in self.wrap(text, font, width):
            self.draw.text((x, self.y), line, font=font, fill=fill)
            self.y += int(size * 1.3)
        self.y += gap

    def row(self, label: str, value: str) -> None:
        """A two-column table row: the label left, the value (wrapped) right."""
        top, split = self.y, MARGIN + 300
        self.text(label, 17, bold=True, fill=_GREY, width=290, gap=0)
        label_bottom, self.y = self.y, top
        self.text(value, 17, x=split, width=WIDTH - MARGIN - split, gap=0)
        self.y = max(self.y, label_bottom) + 6
        self.draw.line((MARGIN, self.y, WIDTH - MARGIN, self.y), fill=(229, 231, 235))
        self.y += 6

    def banner(self) -> None:
        """The research-use notice: red text in a red frame."""
        top = self.y
        self.y += 12
        self.text(RUO_NOTICE, 26, bold=True, fill=_RED, x=MARGIN + 16, width=WIDTH - 2 * MARGIN - 32, gap=2)
        self.text(DISCLAIMER_DETAIL, 17, fill=(127, 29, 29), x=MARGIN + 16, width=WIDTH - 2 * MARGIN - 32, gap=4)
        self.draw.rectangle((MARGIN, top, WIDTH - MARGIN, self.y + 4), outline=_RED, width=3)
        self.draw.rectangle((MARGIN + 3, top + 3, WIDTH - MARGIN - 3, self.y + 1), outline=_PALE_RED, width=1)
        self.y += 24

    def pictures(self, items: list[tuple[np.ndarray, str]]) -> None:
        """Up to two pictures side by side, each scaled to fit ``IMAGE_BOX``, with a caption."""
        x, tallest = MARGIN, 0
        for array, caption in items:
            picture = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
            scale = min(IMAGE_BOX[0] / picture.width, IMAGE_BOX[1] / picture.height)  # small ones grow too
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture = picture.resize(size, Image.Resampling.LANCZOS)
            self.canvas.paste(picture, (x, self.y))
            self.draw.text((x, self.y + picture.height + 4), caption, font=_font(15), fill=_GREY)
            tallest = max(tallest, picture.height + 26)
            x += IMAGE_BOX[0] + 32
        self.y += tallest + 12

    def image(self) -> np.ndarray:
        height = min(MAX_HEIGHT, self.y + MARGIN)
        return np.asarray(self.canvas.crop((0, 0, WIDTH, height)), dtype=np.uint8)


def _months(value: float | None, text: str | None = None, signed: bool = False) -> str:
    if value is None:
        return "\u2014"
    number = f"{value:+.1f} months" if signed else f"{value:.1f} months"
    return f"{text} ({number})" if text else number


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    interval = r.get("bone_age_interval_months")
    interval_text = (f"{format_age(interval[0])} to {format_age(interval[1])} ({interval[0]:.0f}-{interval[1]:.0f} "
                     f"months), {100 * (r.get('interval_level') or 0):.0f}% prediction interval"
                     if interval else "none (the checkpoint has no calibration residuals)")
    normal = r.get("normal_range_months")
    mae = r.get("model_mae_months")
    models = ", ".join(f"{m} ({a})" for m, a in zip(r.get("models") or [], r.get("architectures") or []))
    return [
        ("Bone age", _months(r.get("bone_age_months"), r.get("bone_age_text"))),
        ("Prediction interval", interval_text),
        ("Chronological age", _months(r.get("chronological_age_months"), r.get("chronological_age_text"))),
        ("Sex", r.get("sex") or "unknown"),
        ("Bone age \u2212 chronological age", _months(r.get("difference_months"), signed=True)),
        ("Greulich & Pyle SD", _months(r.get("sd_months"))),
        ("z-score", "\u2014" if r.get("z_score") is None else f"{r['z_score']:+.2f}"),
        ("Category", (r.get("category") or "not compared (no chronological age)")
         + (f"; {r['category_certainty']}" if r.get("category_certainty") else "")),
        ("Normal range", "\u2014" if not normal else f"{format_age(normal[0])} to {format_age(normal[1])} "
         f"(chronological age \u00b1 2 SD; {r.get('reference_standard')})"),
        ("Model's measured error", f"mean absolute error {mae:.1f} months on held-out validation images"
         if mae is not None else "not recorded in the checkpoint"),
        ("Models", models or "\u2014"),
        ("Image check", "\u2014" if r.get("ood_score") is None
         else f"feature distance {r['ood_score']:.2f} \u00d7 the refusal threshold"),
    ]


def render_page(record: dict[str, Any], radiograph: np.ndarray | None = None,
                heatmap: np.ndarray | None = None) -> np.ndarray:
    """The report page of an analysed record as an RGB uint8 array (``WIDTH`` wide, as tall as its content)."""
    page = _Page()
    page.banner()
    page.text("Bone age report", 30, bold=True, gap=10)
    category = record.get("category")
    headline = f"Bone age {record.get('bone_age_text') or _months(record.get('bone_age_months'))}"
    page.text(headline, 34, bold=True, gap=2)
    if category:
        page.text(category.upper(), 22, bold=True, fill=_CATEGORY_COLOURS.get(category, _GREY), gap=8)
    if record.get("summary"):
        page.text(record["summary"], 19, gap=12)
    for label, value in _rows(record):
        page.row(label, value)
    page.y += 10
    if record.get("warnings"):
        page.text("Warnings", 18, bold=True, fill=(180, 83, 9), gap=2)
        for warning in record["warnings"]:
            page.text(f"\u2022 {warning}", 16, gap=2)
        page.y += 10
    pictures = [(a, c) for a, c in ((radiograph, "Radiograph as analysed"),
                                    (heatmap, "Grad-CAM heatmap: regions that drove the estimate"))
                if a is not None]
    if pictures:
        page.pictures(pictures)
    page.text(f"boneage {record.get('boneage_version') or ''} \u00b7 {RUO_NOTICE}", 14, fill=_RED, gap=0)
    return page.image()
