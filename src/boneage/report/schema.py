"""The per-image JSON record (schema version 1.2): field order, empty record, fixed texts.

Every record has every field, in the order of ``boneage.report.fields`` (the one table of names, types
and meanings, from which ``SCHEMA.md`` beside this module is generated); fields that do not apply are
``null``. A file that could not be analysed has ``error`` set and null results. Additive changes bump the
minor version, anything else the major.
"""

from __future__ import annotations

from typing import Any

from boneage import __version__
from boneage.clinical import REFERENCE as GP_REFERENCE
from boneage.report.fields import FIELDS  # noqa: F401 (the record's fields in order: the one table)

SCHEMA_VERSION = "1.3"  # 1.1: the interval fields, bone_age_by_sex_months, normal range, certainty, standard;
# 1.2: ood_score, ood_method; 1.3: status, reason, instance, file_size, file_mtime_ns, report; file is relative
REFERENCE_STANDARD = "Greulich & Pyle, Brush Foundation standard deviations"
RUO_NOTICE = "Research use only \u2014 not a certified medical device"
DISCLAIMER_DETAIL = (
    "This estimate must not be used for diagnosis or treatment; a qualified clinician must read the radiograph."
)
DISCLAIMER = f"{RUO_NOTICE}. {DISCLAIMER_DETAIL}"
RSNA_REFERENCE = (
    "Halabi SS, Prevedello LM, Kalpathy-Cramer J, et al. The RSNA Pediatric Bone Age Machine Learning "
    "Challenge. Radiology 2019;290(2):498-503"
)
REFERENCES = (GP_REFERENCE, RSNA_REFERENCE)


def printable(text: str) -> str:
    """``text`` as valid Unicode: a file name's undecodable bytes (held as surrogates) become U+FFFD.

    Records, reports, logs and CSV cells carry this form, so a non-UTF-8 file name can never make a
    writer raise ``UnicodeEncodeError`` halfway through a batch."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def empty_record(file: str) -> dict[str, Any]:
    """A record with every field: nulls, an empty warnings list and the fixed texts filled in."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(
        schema_version=SCHEMA_VERSION, file=printable(str(file)), sex_source="unknown", warnings=[],
        reference_standard=REFERENCE_STANDARD,
        references=list(REFERENCES), disclaimer=DISCLAIMER, boneage_version=__version__,
    )
    return record
