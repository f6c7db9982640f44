"""A self-contained HTML report per image: numbers, category, images embedded as base64 PNG.

No external resources (fonts, scripts, images): the file can be mailed, archived or printed.
Every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from boneage.atomic import write_text
from boneage.clinical import format_age
from boneage.report.images import png_bytes
from boneage.report.schema import DISCLAIMER_DETAIL, RUO_NOTICE

_CATEGORY_COLOURS = {"delayed": "#1d4ed8", "normal": "#15803d", "advanced": "#c2410c", "indeterminate": "#6b7280"}
_SOURCES = {"cli": "given by the user", "dicom": "from the DICOM header", "unknown": "unknown"}

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f3f4f6;color:#111827}
main{max-width:1000px;margin:0 auto;padding:24px;background:#fff;min-height:100vh}
.ruo{border:3px solid #b91c1c;background:#fef2f2;color:#7f1d1d;padding:12px 16px;border-radius:6px;margin-bottom:20px}
.ruo strong{font-size:1.25em;display:block;margin-bottom:4px}
h1{margin:0 0 4px 0;font-size:1.6em}
.file{color:#4b5563;margin-bottom:16px;word-break:break-all}
.result{display:flex;align-items:baseline;gap:16px;flex-wrap:wrap;margin:12px 0}
.ba{font-size:2.2em;font-weight:700}
.badge{color:#fff;padding:4px 12px;border-radius:999px;font-weight:600;text-transform:uppercase;letter-spacing:.04em}
.summary{font-size:1.1em;margin:8px 0 16px 0}
table{border-collapse:collapse;width:100%;margin:8px 0 16px 0}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{width:34%;color:#374151;font-weight:600}
.warn{background:#fffbeb;border-left:4px solid #d97706;padding:8px 12px;margin:12px 0}
.error{background:#fef2f2;border-left:4px solid #b91c1c;padding:8px 12px;margin:12px 0}
.figs{display:flex;gap:16px;flex-wrap:wrap}
figure{margin:0;flex:1 1 300px}
figure img{width:100%;image-rendering:auto;background:#000;border-radius:4px}
figcaption{font-size:.9em;color:#4b5563;margin-top:4px}
.refs{font-size:.85em;color:#4b5563}
footer{margin-top:24px;font-size:.85em;color:#7f1d1d}
"""


def _img(image: np.ndarray, alt: str) -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _months(value: float | None, text: str | None = None, signed: bool = False) -> str:
    if value is None:
        return "&mdash;"
    number = f"{value:+.1f} months" if signed else f"{value:.1f} months"
    return html.escape(f"{text} ({number})" if text else number)


def _rows(pairs: list[tuple[str, str]]) -> str:
    """Table rows from (header HTML, cell HTML) pairs; callers escape what is not a literal."""
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)


def render_html(record: dict[str, Any], radiograph: np.ndarray | None = None,
                heatmap: np.ndarray | None = None) -> str:
    """The report page for one record; ``radiograph`` (as analysed) and ``heatmap`` are embedded."""
    e = html.escape
    r = record
    name = Path(r["file"]).name
    parts = [f'<div class="ruo" role="alert"><strong>&#9888; {e(RUO_NOTICE)}</strong>{e(DISCLAIMER_DETAIL)}</div>',
             f'<h1>Bone age report</h1><div class="file">{e(name)}</div>']
    if r.get("error"):
        parts.append(f'<div class="error"><strong>Not analysed:</strong> {e(r["error"])}</div>')
    else:
        category = r["category"]
        certainty = (r.get("category_certainty") or "").split(":")[0]
        word = f"{category} ({certainty})" if certainty in ("borderline", "indeterminate") else category
        badge = (f'<span class="badge" style="background:{_CATEGORY_COLOURS.get(category, "#6b7280")}">'
                 f'{e(word)}</span>' if category else "")
        parts.append(f'<div class="result"><span class="ba">Bone age {e(r["bone_age_text"])}</span>{badge}</div>')
        parts.append(f'<p class="summary">{e(r["summary"] or "")}</p>')
        mae = r["model_mae_months"]
        mae_text = (f"mean absolute error {mae:.1f} months on held-out validation images"
                    if mae is not None else "not recorded in the checkpoint")
        interval = r.get("bone_age_interval_months")
        if interval:
            interval_text = e(f"{format_age(interval[0])} to {format_age(interval[1])} "
                              f"({interval[0]:.0f}-{interval[1]:.0f} months), {100 * r['interval_level']:.0f}% "
                              f"prediction interval ({r['interval_method']})")
        else:
            interval_text = "none: the checkpoint has no calibration residuals (an older checkpoint; retrain it)"
        ca_source = _SOURCES.get(r["chronological_age_source"] or "", "")
        parts.append("<table>" + _rows([
            ("Bone age", _months(r["bone_age_months"], r["bone_age_text"])),
            ("Prediction interval", interval_text),
            ("Chronological age", _months(r["chronological_age_months"], r["chronological_age_text"])
             + (f" &middot; {e(ca_source)}" if ca_source else "")),
            ("Sex", f'{e(r["sex"] or "unknown")} &middot; {e(_SOURCES[r["sex_source"]])}'),
            ("Bone age &minus; chronological age", _months(r["difference_months"], signed=True)),
            ("Greulich &amp; Pyle SD", _months(r["sd_months"])),
            ("z-score", "&mdash;" if r["z_score"] is None else e(f'{r["z_score"]:+.2f}')),
            ("Category", e(category or "not compared (no chronological age)")
             + (f' &middot; {e(r["category_reason"])}' if r["category_reason"] else "")
             + (f' &middot; {e(r["category_certainty"])}' if r.get("category_certainty") else "")),
            ("Normal range", "&mdash;" if not r.get("normal_range_months") else e(
                f'{format_age(r["normal_range_months"][0])} to {format_age(r["normal_range_months"][1])} '
                f'(chronological age \u00b1 2 SD; {r["reference_standard"]})')),
            ("Model's measured error", mae_text),
            ("Models", e(", ".join(f"{m} ({a})" for m, a in zip(r["models"], r["architectures"])))),
            ("Runtime", e(f'{r["runtime"]}, test-time augmentation {"on" if r["tta"] else "off"}')),
            ("Image check", "&mdash;" if r.get("ood_score") is None else e(
                f'feature distance {r["ood_score"]:.2f} \u00d7 the refusal threshold ({r["ood_method"]})')),
        ]) + "</table>")
    if r.get("warnings"):
        parts.append('<div class="warn"><strong>Warnings</strong><ul>'
                     + "".join(f"<li>{e(w)}</li>" for w in r["warnings"]) + "</ul></div>")
    figures = []
    if radiograph is not None:
        caption = "Radiograph as analysed" + (" (mirrored: right hand)" if r.get("mirrored") else "")
        figures.append(f"<figure>{_img(radiograph, 'radiograph')}<figcaption>{e(caption)}</figcaption></figure>")
    if heatmap is not None:
        figures.append(f"<figure>{_img(heatmap, 'Grad-CAM heatmap')}<figcaption>Grad-CAM: regions that most "
                       "raised the estimate, over the model's input view. An explanation aid, not a finding."
                       "</figcaption></figure>")
    if figures:
        parts.append('<div class="figs">' + "".join(figures) + "</div>")
    if r.get("identifiers"):
        parts.append("<h2>Patient identifiers</h2><table>"
                     + _rows([(e(k), e(v)) for k, v in r["identifiers"].items()]) + "</table>")
    parts.append('<h2>References</h2><ol class="refs">' + "".join(f"<li>{e(x)}</li>" for x in r["references"])
                 + "</ol>")
    parts.append(f'<footer>{e(r["disclaimer"])} Generated by boneage {e(r["boneage_version"])} '
                 f'(report schema {e(r["schema_version"])}).</footer>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Bone age report &mdash; {e(name)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_html(record: dict[str, Any], path: str | Path, radiograph: np.ndarray | None = None,
               heatmap: np.ndarray | None = None) -> Path:
    """Write the report page to ``path``."""
    return write_text(path, render_html(record, radiograph, heatmap))
