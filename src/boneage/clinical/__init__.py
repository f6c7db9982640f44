"""Clinical interpretation of a bone age: Greulich & Pyle SDs, z-score and category (no torch)."""

from boneage.clinical.interpret import (
    MAX_AGE_MONTHS,
    REFERENCE,
    Z_LIMIT,
    Interpretation,
    TableRow,
    format_age,
    interpret,
    parse_age,
    parse_sex,
    reference_table,
    sd_for_age,
)

__all__ = [
    "MAX_AGE_MONTHS",
    "REFERENCE",
    "Z_LIMIT",
    "Interpretation",
    "TableRow",
    "format_age",
    "interpret",
    "parse_age",
    "parse_sex",
    "reference_table",
    "sd_for_age",
]
