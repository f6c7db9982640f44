"""The per-image record's fields, once: name, JSON type, Python type, whether ``predictions.csv`` has it, and
meaning. ``FIELDS`` (the record's order), the CSV columns, the web API's response model
(``boneage.serve.schemas.ReportRecord``) and ``SCHEMA.md`` are all made from this table
(``python -m boneage.report`` rewrites ``SCHEMA.md``; a test checks it is current)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class _F:
    name: str
    json_type: str  # as SCHEMA.md writes it
    py_type: Any  # the annotation of the API model
    in_csv: bool
    meaning: str


SCHEMA: tuple[_F, ...] = (
    _F('schema_version', 'string', str, False,
       '`"1.3"` (1.1 added the three `interval` fields, `bone_age_by_sex_months`, `normal_range_months`, '
       '`category_certainty` and `reference_standard`; 1.2 added `ood_score` and `ood_method`; 1.3 added '
       '`status`, `reason`, `instance`, `file_size`, `file_mtime_ns` and `report`, and `file` became the path '
       'relative to the input root). Additive changes bump the minor version, others the major.'),
    _F('file', 'string', str, True,
       "the path relative to the input root (the folder given, or the file's own folder; with several inputs, "
       "prefixed by the input as given), or the upload's name; never an absolute path (that is in "
       '`identifiers.path`, with `--keep-identifiers` only). With `file_size` and `file_mtime_ns` it is what a '
       'rerun of `boneage predict` uses to skip files already in the table'),
    _F('status', '`"ok"`, `"failed"`, `"refused"`, `"skipped"` (null only in an empty record)', str | None, True,
       '`ok`: analysed; `failed`: could not be analysed (unreadable, unusable image, ...); `refused`: not a '
       'hand radiograph by its DICOM header (Modality, BodyPartExamined) or by the out-of-distribution check; '
       '`skipped`: not an input (hidden or system file, DICOMDIR, not an image, ...)'),
    _F('reason', 'string or null', str | None, True,
       'for a file not `ok`: a short category to count by (`"unreadable"`, `"unusable image"`, '
       '`"out of distribution"`, `"header: modality CT"`, `"DICOMDIR"`, `"hidden or system file"`, ...); '
       '`error` has the full sentence'),
    _F('instance', 'string or null', str | None, True,
       "DICOM only: a keyed pseudonym of the SOP Instance UID (HMAC-SHA-256 with this site's key, "
       '`--pseudonym-key`): the same image always gets the same value, and nobody without the key can '
       'recover the UID'),
    _F('file_size', 'integer or null', int | None, True,
       'the input file size in bytes'),
    _F('file_mtime_ns', 'integer or null', int | None, True,
       "the input file's modification time (ns since the epoch)"),
    _F('report', 'string or null', str | None, True,
       'where the reports are, relative to `--out`, without the extension (`reports/3f/1380-3fa2c1d0` + '
       '`.json`, `.html`, `_heatmap.png`); null when none were written'),
    _F('error', 'string or null', str | None, True,
       'why the file was not analysed (unreadable, unusable image, ...); `null` when fine. When set, the '
       'result fields are `null`.'),
    _F('bone_age_months', 'number', float | None, True,
       'the estimated bone age: the mean over the ensemble members (and TTA views), clipped to 0-300'),
    _F('bone_age_text', 'string', str | None, True,
       'the same as years and months, e.g. `"9 y 3 m"`'),
    _F('bone_age_interval_months', '`[low, high]` or null', list[float] | None, True,
       'the conformal prediction interval: it holds the true bone age with probability `interval_level` for '
       "images like the validation images (split conformal on the checkpoint's validation residuals, by "
       'predicted-age band; clipped to 0-300). CSV: `interval_low_months`, `interval_high_months`. `null` '
       'for checkpoints without calibration residuals (written before schema 1.1), with a warning'),
    _F('interval_level', 'number or null', float | None, True,
       "the interval's nominal coverage, e.g. `0.9` (`--interval-level`)"),
    _F('interval_method', 'string or null', str | None, False,
       'how it was computed, with the number of calibration images'),
    _F('bone_age_by_sex_months', '`{"M": number, "F": number}` or null', dict[str, float] | None, False,
       'when the sex is unknown (no `--sex`, no DICOM PatientSex) and the model takes the sex as input: the '
       'estimate for each sex. `bone_age_months` is then their mean, a warning gives both, and there is no '
       'z-score or category. `null` when the sex is known'),
    _F('chronological_age_months', 'number or null', float | None, True,
       'from `--chronological-age`, else the DICOM header (StudyDate - PatientBirthDate; PatientAge only '
       'when a date is missing)'),
    _F('chronological_age_text', 'string or null', str | None, False,
       'the same as years and months'),
    _F('chronological_age_source', '`"cli"`, `"dicom"` or null', str | None, True,
       'where the chronological age came from'),
    _F('sex', '`"M"`, `"F"` or null', Literal["M", "F"] | None, True,
       'the sex used'),
    _F('sex_source', '`"cli"`, `"dicom"` or `"unknown"`', str, True,
       'from `--sex`, DICOM PatientSex, or not known (the prediction then averages the male and female '
       'outputs)'),
    _F('difference_months', 'number or null', float | None, True,
       'bone age - chronological age'),
    _F('sd_months', 'number or null', float | None, True,
       'Greulich & Pyle (Brush Foundation) SD of skeletal age at this chronological age and sex'),
    _F('z_score', 'number or null', float | None, True,
       '`difference_months / sd_months`'),
    _F('category', 'string or null', str | None, True,
       '`"delayed"` (z < -2), `"normal"`, `"advanced"` (z > 2), `"indeterminate"` (chronological age given, '
       'but no sex or outside the table); null without chronological age'),
    _F('category_reason', 'string or null', str | None, False,
       'why the category is indeterminate'),
    _F('summary', 'string or null', str | None, False,
       'one sentence for a human reader'),
    _F('normal_range_months', '`[low, high]` or null', list[float] | None, False,
       'chronological age ± 2 SD of the standard: the bone ages called normal'),
    _F('category_certainty', 'string or null', str | None, True,
       'what the prediction interval says about the category: within the normal range, beyond it, '
       '"borderline" when it crosses a limit of normal, "indeterminate" when it spans the whole range'),
    _F('reference_standard', 'string', str, False,
       '`"Greulich & Pyle, Brush Foundation standard deviations"`'),
    _F('model_mae_months', 'number or null', float | None, True,
       "the models' mean absolute error on their validation split, as measured in training (from the "
       'checkpoints)'),
    _F('models', 'list of strings', list[str], True,
       'checkpoint (or `.onnx`) file names of the ensemble members'),
    _F('architectures', 'list of strings', list[str], False,
       'their architectures (`bonenet_s`, `m46`, ...)'),
    _F('runtime', '`"torch"` or `"onnx"`', str, True,
       'what ran the models'),
    _F('tta', 'bool', bool, True,
       'test-time augmentation was used'),
    _F('ood_score', 'number or null', float | None, True,
       "the out-of-distribution check: the distance of the image's pooled encoder features to the training "
       "radiographs', as a multiple of the refusal threshold (a fixed percentile of the training images' own "
       'distances, stored in the checkpoint). Above 1 the file is refused (an `error` record; HTTP 422) '
       'unless the check is off (`--no-ood-check`), and then a warning says so. `null` for models trained '
       'before the check, with a warning'),
    _F('ood_method', 'string or null', str | None, False,
       'how `ood_score` was computed: the distance, the percentile and the number of training images'),
    _F('mirrored', 'bool or null', bool | None, True,
       'the image was flipped (a right hand: `--right-hand` or DICOM ImageLaterality/Laterality = R)'),
    _F('image', 'object or null', dict[str, Any] | None, False,
       '`{"format": "png"/"jpeg"/"dicom"/"array", "width", "height", "bit_depth"}` of the decoded file'),
    _F('heatmap', 'string or null', str | None, True,
       'file name of the Grad-CAM overlay PNG next to the JSON; null without `--out`, with `--no-heatmap` or '
       'with `--runtime onnx`'),
    _F('warnings', 'list of strings', list[str], True,
       'things a reader must know (unknown sex, mirrored image, clipped estimate, ...)'),
    _F('references', 'list of strings', list[str], False,
       'Greulich & Pyle atlas; RSNA Pediatric Bone Age Challenge'),
    _F('disclaimer', 'string', str, False,
       '"Research use only — not a certified medical device. ..."'),
    _F('boneage_version', 'string', str, False,
       'package version that wrote the record'),
    _F('identifiers', 'object or null', dict[str, str] | None, False,
       'DICOM PatientName, PatientID, PatientBirthDate, AccessionNumber, SOPInstanceUID and the absolute '
       '`path` of the input: only with `--keep-identifiers`; otherwise null, and these values appear in no '
       'output at all'),)

FIELDS = tuple(f.name for f in SCHEMA)
# predictions.csv: the scalar fields; the interval as two columns (its low and high ends)
CSV_COLUMNS = tuple(c for f in SCHEMA if f.in_csv for c in (
    ("interval_low_months", "interval_high_months") if f.name == "bone_age_interval_months" else (f.name,)))

_HEAD = """# Per-image report: JSON schema {version}

<!-- Generated from src/boneage/report/fields.py by `python -m boneage.report`: edit that table. -->

`boneage predict ... --out OUT` writes `OUT/<input stem>.json` for every input (also for files that
failed), `OUT/<stem>.html` and `OUT/<stem>_heatmap.png` for every analysed file, and
`OUT/predictions.csv` (one row per input; its columns are the fields marked "CSV" below, the interval as
`interval_low_months` and `interval_high_months`, then the DICOM identifier columns when
`--keep-identifiers` kept any). Two inputs with the same stem get `<stem>`, `<stem>-2`, ... The web API
returns the same record.

Every record has every field, in this order. A field that does not apply is `null`. Months are
floats (bone age to 0.1 month); texts are `"<years> y <months> m"`.

| field | type | CSV | meaning |
|---|---|---|---|
"""


def render_markdown(version: str) -> str:
    """``SCHEMA.md``: the header, then one table row per field."""
    rows = [f"| `{f.name}` | {f.json_type} | {'yes' if f.in_csv else ''} | {f.meaning} |" for f in SCHEMA]
    return _HEAD.format(version=version) + "\n".join(rows) + "\n"


SCHEMA_MD = Path(__file__).with_name("SCHEMA.md")
