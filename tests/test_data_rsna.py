"""Label files: both layouts, every validation message, skip-bad, writing, the real sample."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from boneage.data import read_labels, write_labels
from boneage.errors import DataError


def _png(path: Path) -> None:
    cv2.imwrite(str(path), np.full((8, 8), 100, np.uint8))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for ident in ("1", "2", "3", "4"):
        _png(folder / f"{ident}.png")
    return folder


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_training_layout(tmp_path: Path, images: Path) -> None:
    _png(images / "5.jpg")
    path = _csv(tmp_path, "id,boneage,male,source,split\n3,120,True,x,train\n1,6.5,false,x,train\n"
                          "2,0,1,x,train\n5,240,0,x,train\n")
    df = read_labels(path, images)
    assert list(df.columns) == ["id", "boneage", "male", "path"]
    assert df["id"].tolist() == ["3", "1", "2", "5"]
    assert df["boneage"].tolist() == [120.0, 6.5, 0.0, 240.0]
    assert df["male"].tolist() == [True, False, True, False]
    assert df["male"].dtype == bool and df["boneage"].dtype == float
    assert df["path"].tolist() == [str(images.resolve() / n) for n in ("3.png", "1.png", "2.png", "5.jpg")]


def test_rsna_test_layout(tmp_path: Path, images: Path) -> None:
    path = _csv(tmp_path, "Case ID,Sex,Ground truth bone age (months)\n4,M,168.93\n2,f,94.5\n")
    df = read_labels(path, images)
    assert df["id"].tolist() == ["4", "2"]
    assert df["boneage"].tolist() == [168.93, 94.5]
    assert df["male"].tolist() == [True, False]


def test_missing_file(tmp_path: Path, images: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: labels file not found"):
        read_labels(tmp_path / "nope.csv", images)


def test_empty_file(tmp_path: Path, images: Path) -> None:
    with pytest.raises(DataError, match=r"labels\.csv: labels file is empty \(0 bytes\)"):
        read_labels(_csv(tmp_path, ""), images)


def test_binary_file_is_not_csv(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 10)
    with pytest.raises(DataError, match=r"labels\.csv: not a UTF-8 text CSV"):
        read_labels(path, images)


def test_missing_columns_names_them_and_the_layouts(tmp_path: Path, images: Path) -> None:
    with pytest.raises(DataError) as info:
        read_labels(_csv(tmp_path, "id,boneage\n1,12\n"), images)
    message = str(info.value)
    assert "missing column(s) 'male' for the training layout" in message
    assert "found 'id', 'boneage'" in message
    assert "'Case ID,Sex,Ground truth bone age (months)'" in message


def test_test_layout_missing_column(tmp_path: Path, images: Path) -> None:
    with pytest.raises(DataError, match=r"missing column\(s\) 'Ground truth bone age \(months\)' for the RSNA test"):
        read_labels(_csv(tmp_path, "Case ID,Sex\n1,M\n"), images)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("2,abc,True", "bone age 'abc' is not a number"),
        ("2,,True", "bone age is empty"),
        ("2,nan,True", "bone age is NaN"),
        ("2,-1,True", "bone age -1 is outside 0-240 months"),
        ("2,241,True", "bone age 241 is outside 0-240 months"),
        ("2,12,yes", "male value 'yes' is not True/False (or 1/0)"),
        ("1,12,True", "id 1 duplicates line 2"),
        ("9,12,True", "9.png not found (also looked for .jpg/.jpeg)"),
        ("e,12,True", "e.png is empty (0 bytes)"),
    ],
)
def test_bad_row_raises_with_line_and_reason(tmp_path: Path, images: Path, row: str, reason: str) -> None:
    (images / "e.png").write_bytes(b"")
    path = _csv(tmp_path, f"id,boneage,male\n1,10,True\n{row}\n3,30,False\n")
    with pytest.raises(DataError) as info:
        read_labels(path, images)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: ")
    assert reason in message
    assert "--skip-bad" in message


def test_unknown_sex_in_test_layout(tmp_path: Path, images: Path) -> None:
    path = _csv(tmp_path, "Case ID,Sex,Ground truth bone age (months)\n1,M,10\n2,X,20\n")
    with pytest.raises(DataError, match="line 3: Sex value 'X' is not M or F"):
        read_labels(path, images)


def test_error_counts_the_other_problems_and_blank_lines_keep_numbering(tmp_path: Path, images: Path) -> None:
    path = _csv(tmp_path, "id,boneage,male\n1,10,True\n\n2,x,True\n3,300,True\n4,1,maybe\n")
    with pytest.raises(DataError) as info:
        read_labels(path, images)
    assert re.search(r"line 4: bone age 'x' is not a number; 2 more row\(s\) have problems", str(info.value))


def test_skip_bad_drops_rows_with_one_warning(tmp_path: Path, images: Path) -> None:
    path = _csv(tmp_path, "id,boneage,male\n1,10,True\n2,x,True\n3,30,False\n1,11,True\n9,5,True\n")
    with pytest.warns(UserWarning) as record:
        df = read_labels(path, images, skip_bad=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 3 bad row(s) of 5" in message
    assert "line 3: bone age 'x' is not a number" in message
    assert "line 5: id 1 duplicates line 2" in message
    assert "line 6: image" in message and "9.png not found" in message
    assert df["id"].tolist() == ["1", "3"]


def test_skip_bad_warning_lists_only_the_first_five(tmp_path: Path, images: Path) -> None:
    bad = "".join(f"{i},x,True\n" for i in range(10, 17))
    path = _csv(tmp_path, f"id,boneage,male\n1,10,True\n{bad}")
    with pytest.warns(UserWarning, match=r"skipped 7 bad row\(s\) of 8: .*line 6: .*; and 2 more$"):
        read_labels(path, images, skip_bad=True)


def test_zero_usable_rows_is_an_error_even_with_skip_bad(tmp_path: Path, images: Path) -> None:
    path = _csv(tmp_path, "id,boneage,male\n1,x,True\n")
    with pytest.raises(DataError, match=r"no usable rows \(first: line 2: bone age 'x' is not a number\)"):
        read_labels(path, images, skip_bad=True)
    with pytest.raises(DataError, match="no usable rows"):
        read_labels(_csv(tmp_path, "id,boneage,male\n"), images)


def test_check_files_false_skips_image_checks(tmp_path: Path, images: Path) -> None:
    df = read_labels(_csv(tmp_path, "id,boneage,male\n77,10,True\n"), tmp_path / "absent", check_files=False)
    assert df["path"].tolist() == [str((tmp_path / "absent" / "77.png").resolve())]


def test_missing_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent: image folder not found; check the path \(--images\)"):
        read_labels(_csv(tmp_path, "id,boneage,male\n1,10,True\n"), tmp_path / "absent")


def test_write_labels_round_trip(tmp_path: Path, images: Path) -> None:
    df = pd.DataFrame({"id": ["2", "1"], "boneage": [12.5, 200.0], "male": [False, True], "extra": [1, 2]})
    out = write_labels(df, tmp_path / "sub" / "out.csv")
    assert out.read_text().splitlines() == ["id,boneage,male", "2,12.5,False", "1,200.0,True"]
    back = read_labels(out, images)
    assert back[["id", "boneage", "male"]].equals(df[["id", "boneage", "male"]])


def test_write_labels_needs_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lacks column"):
        write_labels(pd.DataFrame({"id": ["1"]}), tmp_path / "x.csv")


@pytest.mark.realdata
def test_real_rsna_sample(rsna_dir: Path) -> None:
    df = read_labels(rsna_dir / "labels.csv", rsna_dir / "images")
    assert len(df) == 6759
    assert df["id"].is_unique
    assert df["boneage"].between(1, 228).all()
    assert int(df["male"].sum()) == 3661
    assert all(p.endswith(".png") for p in df["path"])
    assert Path(df["path"].iloc[0]).is_file()
