"""Hypothesis-generated bad input: config overrides, label CSVs, DICOM headers, ages and multipart API requests.
Whatever comes in, the result is a value or a BoneAgeError with a message, never another exception (a traceback
for the user), and the API answers 200 or a 4xx with a message, never a 5xx."""

from __future__ import annotations

import string
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from boneage.clinical import parse_age, parse_sex
from boneage.config import Config, load_config
from boneage.data.rsna import read_labels
from boneage.errors import BoneAgeError
from boneage.io import read_image
from dicom_fixtures import hand_pixels, make_dicom

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = sorted(f"{section}.{key}" for section, fields in Config().to_dict().items() if isinstance(fields, dict)
              for key in fields)
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "true", "false", "null", ".nan", "-.inf", "[1, 2]", "{a: 1}", "'x'", "1e400", "0x10",
                     "~", "adamw", "cpu", "none", "strong", "age", "sex", "!!python/object:os.system ls"]),
    st.text(string.printable, max_size=12),
)


@FAST
@given(key=st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "._", min_size=1, max_size=15)),
       value=VALUES)
def test_any_override_gives_a_config_or_a_config_error(key, value):
    try:
        cfg = load_config("cpu-small", [f"{key}={value}"])
    except BoneAgeError as exc:
        assert str(exc)
        return
    assert cfg.validate() == cfg  # whatever was accepted is a valid config


SPECIAL_CELLS = ["", "nan", "-1", "1e9", "True", "M", "F", "0", "228", "\"", ",", "\x00"]
CELLS = st.one_of(st.text(string.printable, max_size=8), st.sampled_from(SPECIAL_CELLS))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-images")
    for i in range(3):
        Image.fromarray(hand_pixels(bits=8, seed=i)).save(folder / f"{i + 1}.png")
    return folder


@FAST
@given(header=st.sampled_from(["id,boneage,male", "Case ID,Sex,Ground truth bone age (months)", "id,boneage",
                               "a,b,c", ""]),
       rows=st.lists(st.lists(CELLS, min_size=0, max_size=4), max_size=5))
def test_any_label_csv_gives_a_table_or_a_data_error(tmp_path_factory, images, header, rows):
    path = tmp_path_factory.mktemp("csv") / "labels.csv"
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n", encoding="utf-8", errors="replace")
    for skip_bad in (False, True):
        try:
            table = read_labels(path, images, skip_bad=skip_bad)
        except BoneAgeError as exc:
            assert str(path) in str(exc)
            continue
        assert {"id", "boneage", "male", "path"} <= set(table.columns)


DICOM_ELEMENTS = [  # (tag, VR) pairs whose values a broken exporter gets wrong
    (0x00280008, "IS"), (0x00280010, "US"), (0x00280011, "US"), (0x00280002, "US"), (0x00281050, "DS"),
    (0x00281051, "DS"), (0x00281052, "DS"), (0x00281053, "DS"), (0x00280101, "US"), (0x00280100, "US"),
    (0x00101010, "AS"), (0x00100040, "CS"), (0x00100030, "DA"), (0x00080020, "DA"), (0x00200062, "CS"),
    (0x00280004, "CS"),
]
RAW = st.one_of(st.binary(max_size=6), st.sampled_from([b"abc", b"0", b"-1", b"1\\2", b"99999", b"", b"\xff\xff"]))


@FAST
@given(changes=st.lists(st.tuples(st.sampled_from(DICOM_ELEMENTS), RAW), min_size=1, max_size=4))
def test_any_dicom_header_gives_an_image_or_an_image_error(tmp_path_factory, changes):
    path = make_dicom(tmp_path_factory.mktemp("dcm") / "x.dcm", hand_pixels(120, 100, bits=12))
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (tag, vr), raw in changes:
            ds[tag] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(tag), vr, len(raw), raw, 0, False, True)
        try:
            ds.save_as(path)
        except Exception:  # noqa: BLE001 - pydicom cannot even write this header: not a case for read_image
            return
    try:
        image, meta = read_image(path)
    except BoneAgeError as exc:
        assert str(path) in str(exc)
        return
    assert image.ndim == 2 and image.size > 0


@FAST
@given(text=st.one_of(st.text(max_size=12), st.integers(-1000, 1000), st.floats(allow_nan=True)))
def test_any_age_or_sex_gives_a_value_or_a_clear_error(text):
    for parse in (parse_age, parse_sex):
        try:
            parse(text)
        except BoneAgeError as exc:
            assert "accepted" in str(exc)


# --- multipart requests to the API ------------------------------------------------------------------------------

TEXT = st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["F", "M", "x", "14", "14y", "9y15m", "-3m", "1e9",
                                                                   "nan", "\x00", "\u202e", "=1+1"]))


def _png(array) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from boneage.serve.app import ServiceOptions, create_app
    from helpers_predict import make_checkpoint

    app = create_app(ServiceOptions([make_checkpoint(tmp_path_factory.mktemp("fuzz") / "m.pt")], threads=1,
                                    warmup=False, max_upload_mb=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, _png(hand_pixels(bits=8))
    app.state.service.close()


@FAST
@given(image=st.one_of(st.none(), st.binary(max_size=300), st.sampled_from(["good", "truncated", "noise"])),
       name=st.one_of(st.text(max_size=30), st.sampled_from(["a.png", "a.dcm", "../../x.png", "", ".png", "a.txt"])),
       field=st.sampled_from(["image", "image", "file"]), sex=TEXT, age=TEXT, months=TEXT, right=TEXT,
       content_type=st.sampled_from(["image/png", "application/octet-stream", "text/plain", "", "a/b; x=\"y\""]))
def test_any_multipart_request_gets_a_clear_answer_never_a_5xx(api, image, name, field, sex, age, months, right,
                                                               content_type):
    client, good = api
    payload = {"good": good, "truncated": good[: len(good) // 2],
               "noise": _png(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8))}
    data = {k: v for k, v in (("sex", sex), ("chronological_age", age), ("chronological_age_months", months),
                              ("right_hand", right)) if v is not None}
    files = None if image is None else {field: (name, payload.get(image, image) if isinstance(image, str) else image,
                                                content_type)}
    r = client.post("/api/v1/predict", files=files, data=data)
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or isinstance(r.json()["detail"], str) and r.json()["detail"]


@FAST
@given(body=st.binary(max_size=400), boundary=st.text(string.ascii_letters + string.digits + "-'()+_,./:=?",
                                                      min_size=0, max_size=70))
def test_any_raw_body_under_a_multipart_header_gets_a_4xx(api, body, boundary):
    client, _ = api
    r = client.post("/api/v1/predict", content=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= r.status_code < 500, r.text
