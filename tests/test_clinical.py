"""Clinical interpretation: G&P table, SD interpolation, z-score, category and the parsers."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from boneage.clinical import (
    REFERENCE,
    format_age,
    interpret,
    parse_age,
    parse_sex,
    reference_table,
    sd_for_age,
)
from boneage.errors import BoneAgeError

# --- table ------------------------------------------------------------------------------------


def test_table_has_both_sexes_with_the_published_ranges():
    table = reference_table()
    assert set(table) == {"M", "F"}
    assert len(table["M"]) == 24 and len(table["F"]) == 23
    assert table["M"][0].chronological_age_months == 3 and table["M"][-1].chronological_age_months == 204
    assert table["F"][0].chronological_age_months == 3 and table["F"][-1].chronological_age_months == 192


@pytest.mark.parametrize("sex", ["M", "F"])
def test_table_ages_increase_and_sds_are_positive(sex):
    rows = reference_table()[sex]
    ages = [r.chronological_age_months for r in rows]
    means = [r.mean_skeletal_age_months for r in rows]
    assert all(a < b for a, b in zip(ages, ages[1:]))
    assert all(a < b for a, b in zip(means, means[1:]))
    assert all(0 < r.sd_months < 15 for r in rows)


def test_table_values_match_the_transcribed_source():
    boys = {r.chronological_age_months: r.sd_months for r in reference_table()["M"]}
    girls = {r.chronological_age_months: r.sd_months for r in reference_table()["F"]}
    assert (boys[3], boys[60], boys[120], boys[204]) == (0.69, 8.79, 9.79, 13.05)
    assert (girls[3], girls[60], girls[144], girls[192]) == (0.72, 11.65, 10.24, 7.31)


# --- SD lookup and z-score --------------------------------------------------------------------


def test_exact_table_entry_boys_120_months():
    result = interpret(140, 120, "M")  # boys 120 m: SD 9.79
    assert result.sd_months == 9.79
    assert result.difference_months == 20
    assert result.z_score == round(20 / 9.79, 2)  # 2.04: the category is decided on the z shown
    assert result.category == "advanced"
    assert interpret(139, 120, "M").category == "normal"  # 19 / 9.79 = 1.94


def test_exact_table_entry_girls_60_months():
    result = interpret(36, 60, "F")  # girls 60 m: SD 11.65
    assert result.sd_months == 11.65
    assert result.z_score == round(-24 / 11.65, 2)  # -2.06
    assert result.category == "delayed"


def test_interpolated_sd_boys_between_96_and_108_months():
    # boys 96 m: SD 9.10, 108 m: SD 9.00
    sd = 9.10 + (100 - 96) * (9.00 - 9.10) / (108 - 96)  # 9.0667
    result = interpret(110, 100, "M")
    assert result.sd_months == pytest.approx(sd)
    assert result.z_score == round(10 / sd, 2)  # 1.10
    assert result.category == "normal"
    assert result.summary == (
        "Bone age 9 y 2 m is 0 y 10 m ahead of chronological age 8 y 4 m (z = +1.10, within normal limits)."
    )


def test_interpolated_sd_girls_between_42_and_48_months():
    # girls 42 m: SD 7.48, 48 m: SD 8.98
    sd = 7.48 + (45 - 42) * (8.98 - 7.48) / (48 - 42)  # 8.23
    assert sd_for_age(45, "F") == pytest.approx(8.23)
    result = interpret(28, 45, "F")
    assert result.z_score == round(-17 / sd, 2)  # -2.07
    assert result.category == "delayed"
    assert "behind" in result.summary and "delayed" in result.summary


@pytest.mark.parametrize(
    ("bone_age", "category"),
    [(126.0, "normal"), (90.0, "normal"), (126.1, "advanced"), (89.9, "delayed"),
     (126.04, "normal"), (89.96, "normal")],  # z = +2.004 / -2.004 are shown, and judged, as +2.00 / -2.00
)
def test_category_boundaries_at_two_sd(bone_age, category):
    # boys 108 m: SD 9.00 exactly, so +-2 SD is +-18 months with no rounding
    result = interpret(bone_age, 108, "M")
    assert result.sd_months == 9.0
    assert result.category == category


@pytest.mark.parametrize(("age", "sex"), [(3, "M"), (204, "M"), (3, "F"), (192, "F"), (193, "M")])
def test_table_edges_are_inside(age, sex):
    assert interpret(age, age, sex).category == "normal"


@pytest.mark.parametrize(("age", "sex"), [(2.4, "M"), (204.5, "M"), (193, "F"), (0, "F"), (250, "M")])
def test_outside_table_is_indeterminate(age, sex):
    result = interpret(100, age, sex)
    assert result.category == "indeterminate"
    assert result.sd_months is None and result.z_score is None
    assert result.difference_months == pytest.approx(100 - age)
    assert "outside" in result.reason and "outside" in result.summary


def test_outside_reason_names_the_range():
    reason = interpret(100, 200, "F").reason
    assert reason == (
        "chronological age 16 y 8 m is outside the Greulich & Pyle SD table for girls (0 y 3 m to 16 y 0 m)"
    )


def test_without_sex_is_indeterminate_but_keeps_the_difference():
    result = interpret(122, 109, None)
    assert result.category == "indeterminate"
    assert result.sex is None and result.sd_months is None and result.z_score is None
    assert result.difference_months == 13
    assert "sex" in result.reason


def test_without_chronological_age_reports_bone_age_only():
    result = interpret(122, None, "F")
    assert result.bone_age_months == 122
    assert result.chronological_age_months is None
    assert result.difference_months is None and result.sd_months is None and result.z_score is None
    assert result.category is None
    assert result.summary.startswith("Bone age 10 y 2 m;")


def test_matching_ages_say_matches():
    assert interpret(60.2, 60, "boy").summary == (
        "Bone age 5 y 0 m matches chronological age 5 y 0 m (z = +0.02, within normal limits)."
    )


def test_sex_words_and_booleans_are_accepted():
    assert interpret(140, 120, True).sex == "M"
    assert interpret(140, 120, "female").sex == "F"


@pytest.mark.parametrize("bad", [-1, 301, float("nan")])
def test_interpret_rejects_impossible_ages(bad):
    with pytest.raises(BoneAgeError):
        interpret(bad, 100, "M")
    with pytest.raises(BoneAgeError):
        interpret(100, bad, "M")


def test_to_dict_is_json_ready_and_result_is_frozen():
    result = interpret(140, 120, "M")
    data = result.to_dict()
    assert data["category"] == "advanced" and data["reference"] == REFERENCE
    assert json.loads(json.dumps(data)) == data
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.category = "normal"


# --- parse_age ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "months"),
    [
        ("111m", 111.0),
        (" 111 months ", 111.0),
        ("9y3m", 111.0),
        ("9y 3m", 111.0),
        ("9 y 3 m", 111.0),
        ("9 years 3 months", 111.0),
        ("9Y3M", 111.0),
        ("9y", 108.0),
        ("9.25y", 111.0),
        ("0m", 0.0),
        ("25y", 300.0),
        (111, 111.0),
        (110.5, 110.5),
        (np.int64(111), 111.0),
    ],
)
def test_parse_age_accepts(text, months):
    assert parse_age(text) == months


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("9y15m", "below 12"),
        ("9y12m", "below 12"),
        ("-5m", "negative"),
        (-5, "negative"),
        ("", "empty"),
        ("   ", "empty"),
        ("301m", "above 300"),
        ("111", "without a unit"),
        ("14", "without a unit"),
        (" 9.5 ", "without a unit"),
        ("26y", "above 300"),
        ("abc", "not a recognised"),
        ("9.5y3m", "whole years"),
        ("3m9y", "not a recognised"),
        (float("inf"), "finite"),
        (True, "boolean"),
        (None, "expected text"),
    ],
)
def test_parse_age_rejects(text, why):
    with pytest.raises(BoneAgeError) as err:
        parse_age(text)
    message = str(err.value)
    assert repr(text) in message and why in message and "9y3m" in message


@given(st.integers(0, 20), st.integers(0, 11))
def test_parse_age_years_months_property(years, months):
    assert parse_age(f"{years}y{months}m") == 12 * years + months


@given(st.integers(0, 300))
def test_format_age_round_trips_through_parse_age(months):
    assert parse_age(format_age(months)) == months


# --- parse_sex / format_age ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sex"),
    [
        ("M", "M"), ("m", "M"), ("Male", "M"), ("BOY", "M"), (" boy ", "M"), (True, "M"), (np.bool_(True), "M"),
        ("F", "F"), ("f", "F"), ("FEMALE", "F"), ("Girl", "F"), (False, "F"), (np.bool_(False), "F"),
    ],
)
def test_parse_sex_accepts(text, sex):
    assert parse_sex(text) == sex


@pytest.mark.parametrize("text", ["x", "", "unknown", "man", 1, None])
def test_parse_sex_rejects_with_accepted_values(text):
    with pytest.raises(BoneAgeError) as err:
        parse_sex(text)
    assert repr(text) in str(err.value) and "male, female, boy, girl" in str(err.value)


@pytest.mark.parametrize(
    ("months", "text"),
    [(111, "9 y 3 m"), (0, "0 y 0 m"), (12, "1 y 0 m"), (11.5, "1 y 0 m"), (122.4, "10 y 2 m"), (-13, "-1 y 1 m")],
)
def test_format_age(months, text):
    assert format_age(months) == text


def test_clinical_does_not_import_torch():
    code = "import sys, boneage.clinical; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# Two other public copies of the Brush Foundation SD column (clinical/SOURCES.md, "Cross-check"), by sex, at
# 3, 6, 9, 12, 18, 24, 30, ..., 60 months, then yearly: dfnr2/bone-age-app BrushFoundationData.js and the
# BFstdevs arrays of a public jQuery report page (identical to each other).
OTHER_COPIES_SD = {
    "M": [0.69, 1.13, 1.43, 1.97, 3.52, 3.92, 4.52, 5.08, 5.4, 6.66, 8.36, 8.79, 9.17, 8.91, 9.1, 9, 9.79, 10.09,
          10.38, 10.44, 10.72, 11.32, 12.86, 13.05],
    "F": [0.72, 1.16, 1.36, 1.77, 3.49, 4.64, 5.37, 5.97, 7.48, 8.98, 10.73, 11.65, 10.23, 9.64, 10.23, 10.74, 11.73,
          11.94, 10.24, 10.67, 11.3, 9.23, 7.31],
}
OTHER_COPIES_AGES = [3, 6, 9, 12, 18, 24, 30, 36, 42, 48, 54, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180,
                     192, 204]


def test_the_sd_table_agrees_cell_for_cell_with_two_other_public_copies():
    import csv
    import io
    from importlib import resources

    text = (resources.files("boneage") / "clinical" / "greulich_pyle.csv").read_text()
    rows = list(csv.DictReader(io.StringIO("".join(line for line in text.splitlines(True)
                                                   if not line.startswith("#")))))
    for sex, sds in OTHER_COPIES_SD.items():
        ours = [(float(r["chronological_age_months"]), float(r["sd_months"])) for r in rows if r["sex"] == sex]
        assert ours == list(zip(map(float, OTHER_COPIES_AGES), sds)), sex


@pytest.mark.parametrize("sex", ["M", "F"])
def test_the_category_never_contradicts_the_z_score_it_shows(sex):
    """Sweep bone ages across z = -2 and +2 at several ages: the shown z (2 decimals) decides the category."""
    for ca in (12.0, 60.0, 111.0, 150.0, 180.0):
        sd = interpret(ca, ca, sex).sd_months
        for k in np.linspace(-2.02, 2.02, 809):
            result = interpret(ca + k * sd, ca, sex)
            shown = float(re.search(r"z = ([+-]\d+\.\d\d)", result.summary)[1])
            assert shown == result.z_score
            expected = "advanced" if shown > 2 else "delayed" if shown < -2 else "normal"
            assert result.category == expected, (ca, k, result.summary)


@pytest.mark.parametrize("sex", ["M", "F"])
def test_age_range_messages_never_contradict_their_bounds(sex):
    rows = reference_table()[sex]
    for bound in (rows[0].chronological_age_months, rows[-1].chronological_age_months):
        for ca in np.arange(bound - 1.5, bound + 1.5, 0.05):
            result = interpret(120.0, float(ca), sex)
            inside_as_shown = rows[0].chronological_age_months <= math.floor(ca + 0.5) <= \
                rows[-1].chronological_age_months
            if inside_as_shown:
                assert result.z_score is not None, (ca, result.summary)
            else:
                assert result.category == "indeterminate" and "outside" in result.reason
                assert format_age(ca) not in (format_age(rows[0].chronological_age_months),
                                              format_age(rows[-1].chronological_age_months))
