"""Archive discovery (boneage.inference.sources) and the DICOM header check (boneage.inference.header_check)."""

import os
import pickle
import shutil
import sys
from collections import Counter

import pydicom
import pytest
from pydicom.fileset import FileSet

from boneage.errors import HeaderRefusedError
from boneage.inference import sources
from boneage.inference.header_check import check_header
from boneage.inference.sources import (
    SKIP_DICOMDIR, SKIP_DUPLICATE, SKIP_HIDDEN, SKIP_LOOP, SKIP_NOT_IMAGE, SKIP_SUBFOLDER, SKIP_UNREADABLE,
    SourceItem, Skipped, is_dicom_file, is_dicomdir, open_sources, read_dicomdir, sniff_kind, upload_item,
    walk_folder)
from boneage.io import list_images, read_image
from dicom_fixtures import make_dicom
from helpers_predict import hand_image, save_png

UID_NAME = "1.2.840.113619.2.55.3.604688119.1"
needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")


def _split(found):
    found = list(found)
    items = [f for f in found if isinstance(f, SourceItem)]
    skipped = {f.key: f.reason for f in found if isinstance(f, Skipped)}
    assert len(items) + len(skipped) == len(found)
    return [i.key for i in items], skipped


def _no_repeats(keys):
    assert len(keys) == len(set(keys)), Counter(keys).most_common(3)


def _pacs_folder(tmp_path):
    """DICOMs named as PACS exports name them, one in a subfolder."""
    folder = tmp_path / "export"
    (folder / "sub" / "deeper").mkdir(parents=True)
    for name in (UID_NAME, "x.IMA", "y.DCM", "IM0001"):
        make_dicom(folder / name)
    make_dicom(folder / "sub" / "deeper" / "IM0002")
    return folder


def test_dicoms_are_found_whatever_their_name(tmp_path):
    folder = _pacs_folder(tmp_path)
    keys, skipped = _split(walk_folder(folder))
    assert keys == sorted([UID_NAME, "x.IMA", "y.DCM", "IM0001"]) and skipped == {"sub/": SKIP_SUBFOLDER}
    keys, skipped = _split(open_sources([folder], recursive=True))
    assert keys == sorted([UID_NAME, "x.IMA", "y.DCM", "IM0001"]) + ["sub/deeper/IM0002"] and not skipped
    for name in (UID_NAME, "x.IMA", "y.DCM", "IM0001"):
        assert is_dicom_file(folder / name) and sniff_kind(folder / name) == "dicom"
    item = next(i for i in open_sources([folder]) if i.key == "x.IMA")
    stat = (folder / "x.IMA").stat()
    assert (item.path, item.size, item.mtime_ns, item.root) == (folder / "x.IMA", stat.st_size, stat.st_mtime_ns,
                                                                str(folder))


def _cd(tmp_path, n=2):
    """A DICOM CD as pydicom's FileSet writes it: DICOMDIR + PT000000/ST00000k/SE000000/IM000000."""
    fs = FileSet()
    for k in range(n):
        ds = pydicom.dcmread(make_dicom(tmp_path / f"src{k}.dcm"))
        ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "120000", str(k), 1, 1
        fs.add(ds)
    cd = tmp_path / "cd"
    fs.write(cd)
    return cd


def test_a_dicom_cd_is_read_through_its_dicomdir_or_by_the_walk(tmp_path):
    cd = _cd(tmp_path)
    images = sorted(p.relative_to(cd).as_posix() for p in cd.rglob("IM*"))
    assert len(images) == 2 and all(k.count("/") == 3 for k in images)
    found = list(open_sources([cd]))  # no --recursive: the DICOMDIR lists the images
    keys, skipped = _split(found)
    assert sorted(keys) == images and skipped == {"DICOMDIR": SKIP_DICOMDIR}
    assert isinstance(found[-1], Skipped)  # the images first, then the DICOMDIR
    keys, skipped = _split(open_sources([cd], recursive=True))
    assert keys == images and skipped == {"DICOMDIR": SKIP_DICOMDIR}
    keys, skipped = _split(open_sources([cd / "DICOMDIR"]))  # the DICOMDIR itself, given by name
    assert sorted(keys) == images and not skipped
    assert is_dicomdir(cd / "DICOMDIR") and not is_dicomdir(tmp_path / "src0.dcm")
    shutil.copy(cd / "DICOMDIR", tmp_path / "index.dcm")
    assert is_dicomdir(tmp_path / "index.dcm")  # by its SOP class
    assert list_images([cd]) == [cd / k for k in keys]


def test_a_dicomdir_file_that_is_missing_is_skipped_by_name(tmp_path):
    cd = _cd(tmp_path)
    gone = sorted(cd.rglob("IM*"))[0]
    gone.unlink()
    keys, skipped = _split(read_dicomdir(cd / "DICOMDIR"))
    missing = gone.relative_to(cd).as_posix()
    assert len(keys) == 1 and skipped == {missing: SKIP_UNREADABLE}
    detail = next(f.detail for f in read_dicomdir(cd / "DICOMDIR") if isinstance(f, Skipped))
    assert missing in detail and "1.2." not in detail
    (cd / "DICOMDIR").write_bytes(b"\0" * 200)  # damaged: the folder's subfolders are reported instead
    keys, skipped = _split(open_sources([cd]))
    assert keys == [] and skipped == {"DICOMDIR": SKIP_UNREADABLE, "PT000000/": SKIP_SUBFOLDER}


def test_junk_is_skipped_with_its_reason(tmp_path):
    save_png(tmp_path / "5.png", hand_image())
    save_png(tmp_path / "._1380.png", hand_image())
    for name, data in ((".DS_Store", b"\0\0\0\1Bud1"), ("Thumbs.db", b"\xd0\xcf\x11\xe0"), ("desktop.ini", b"[x]"),
                       ("notes.txt", b"hello"), ("labels.csv", b"id,boneage\n1,100\n"), ("empty", b"")):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.png").write_bytes(b"not a png")  # named like an image: read_image says what is wrong
    (tmp_path / ".git").mkdir()
    keys, skipped = _split(open_sources([tmp_path], recursive=True))
    assert keys == ["5.png", "broken.png"]
    assert skipped == {"._1380.png": SKIP_HIDDEN, ".DS_Store": SKIP_HIDDEN, "Thumbs.db": SKIP_HIDDEN,
                       "desktop.ini": SKIP_HIDDEN, ".git/": SKIP_HIDDEN, "notes.txt": SKIP_NOT_IMAGE,
                       "labels.csv": SKIP_NOT_IMAGE, "empty": SKIP_NOT_IMAGE}
    assert [i.key for i in open_sources([tmp_path / "._1380.png"])] == ["._1380.png"]  # given by name: read


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_pipes_are_skipped_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever
    assert _split(open_sources([tmp_path])) == ([], {"pipe": SKIP_NOT_IMAGE})


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_files_are_skipped(tmp_path):
    save_png(tmp_path / "locked.png", hand_image()).chmod(0)
    save_png(tmp_path / "ok.png", hand_image())
    assert _split(open_sources([tmp_path])) == (["ok.png"], {"locked.png": SKIP_UNREADABLE})


def test_same_names_in_different_folders_get_distinct_keys(tmp_path, monkeypatch):
    for folder in ("scans", "more"):
        (tmp_path / folder).mkdir()
        save_png(tmp_path / folder / "5.png", hand_image())
    monkeypatch.chdir(tmp_path)
    keys, skipped = _split(open_sources(["scans", "./more/", "more/5.png", "scans"]))
    assert keys == ["scans/5.png", "more/5.png"]
    assert skipped == {"more/5.png": SKIP_DUPLICATE, "scans": SKIP_DUPLICATE}  # never dropped silently
    keys, _ = _split(open_sources([tmp_path / "scans", tmp_path / "more"]))
    assert keys == ["scans/5.png", "more/5.png"]  # relative to the inputs' common folder: no absolute path
    keys, skipped = _split(open_sources(["scans/5.png", "*/5.png"]))  # a file, then a glob reaching it again
    assert keys == ["scans/5.png", "more/5.png"] and skipped == {"scans/5.png": SKIP_DUPLICATE}
    assert [i.key for i in open_sources(["scans/5.png"])] == ["5.png"]


def test_globs_are_keyed_from_their_start_and_a_glob_without_match_is_kept(tmp_path, monkeypatch):
    folder = _pacs_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    keys, _ = _split(open_sources(["export/**/IM*"], recursive=True))
    assert keys == ["IM0001", "sub/deeper/IM0002"]
    found = list(open_sources(["export/nothing*.png"]))
    assert found == [SourceItem("export/nothing*.png", folder.relative_to(tmp_path) / "nothing*.png",
                                root="export")]


@needs_symlinks
def test_a_symlink_loop_ends_and_is_reported(tmp_path):
    save_png(tmp_path / "a.png", hand_image())
    (tmp_path / "sub").mkdir()
    save_png(tmp_path / "sub" / "b.png", hand_image())
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a folder link to its parent's parent
    os.symlink(tmp_path / "sub", tmp_path / "twin")  # the same folder twice
    os.symlink(tmp_path / "a.png", tmp_path / "z_link.png")  # a file link to a file the walk reads
    keys, skipped = _split(open_sources([tmp_path], recursive=True))
    assert keys == ["a.png", "sub/b.png"]
    assert skipped == {"sub/loop/": SKIP_LOOP, "twin/": SKIP_LOOP, "z_link.png": SKIP_DUPLICATE}
    keys, skipped = _split(open_sources([str(tmp_path / "**" / "*.png")], recursive=True))
    _no_repeats(keys)
    assert keys == ["a.png", "sub/b.png"] and set(skipped.values()) == {SKIP_DUPLICATE, SKIP_LOOP}
    keys, skipped = _split(open_sources([str(tmp_path / "*" / "*.png")]))  # sub/ and twin/: the same folder
    assert keys == ["sub/b.png"] and skipped == {"twin/b.png": SKIP_DUPLICATE}


def test_a_folder_beyond_the_sort_limit_still_gives_every_file_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SORT_LIMIT", 5)
    png = save_png(tmp_path / "f00.png", hand_image(160, 140)).read_bytes()
    expected = {"f00.png"}
    for k in range(1, 13):
        (tmp_path / f"f{k:02d}.png").write_bytes(png)
        expected.add(f"f{k:02d}.png")
    for sub in ("s1", "s2"):
        (tmp_path / sub).mkdir()
        for k in range(7):
            (tmp_path / sub / f"g{k}.png").write_bytes(png)
            expected.add(f"{sub}/g{k}.png")
    (tmp_path / "notes.txt").write_text("x")
    keys, skipped = _split(open_sources([tmp_path], recursive=True))
    _no_repeats(keys)
    assert set(keys) == expected and skipped == {"notes.txt": SKIP_NOT_IMAGE}
    first_sub = next(i for i, k in enumerate(keys) if "/" in k)
    assert all("/" not in k for k in keys[:first_sub]) and all("/" in k for k in keys[first_sub:])  # files first
    keys, skipped = _split(open_sources([tmp_path]))
    assert set(keys) == {k for k in expected if "/" not in k}
    assert skipped == {"notes.txt": SKIP_NOT_IMAGE, "s1/": SKIP_SUBFOLDER, "s2/": SKIP_SUBFOLDER}
    keys, _ = _split(open_sources([str(tmp_path / "*.png")]))
    assert sorted(keys) == sorted(k for k in expected if "/" not in k)


def test_upload_items_are_keyed_by_their_printable_base_name():
    item = upload_item("C:\\Users\\x\\scan\x07 7.png", b"abc")
    assert (item.key, item.path, item.data, item.size, item.mtime_ns) == ("scan 7.png", None, b"abc", 3, -1)
    assert upload_item("../\x00", b"").key == "upload"


# --- DICOM header check ---------------------------------------------------------------------------


@pytest.mark.parametrize(("modality", "body_part", "reason"), [
    ("CT", "HAND", "header: modality CT"), ("MR", None, "header: modality MR"),
    ("DX", "CHEST", "header: body part CHEST"), ("CR", "Lower Extremity", "header: body part LOWER EXTREMITY"),
])
def test_the_header_check_refuses_other_studies(tmp_path, modality, body_part, reason):
    _, meta = read_image(make_dicom(tmp_path / "x.dcm", modality=modality, body_part=body_part))
    with pytest.raises(HeaderRefusedError) as info:
        check_header(meta)
    assert info.value.reason == reason
    message = str(info.value)
    assert str(tmp_path / "x.dcm") in message and "--no-header-check" in message and "\n" not in message
    assert pickle.loads(pickle.dumps(info.value)).reason == reason  # crosses worker processes


@pytest.mark.parametrize(("modality", "body_part"), [
    ("CR", "HAND"), ("DX", "HAND"), ("DX", "L WRIST"), ("CR", "UPPER_EXTREMITY"), ("DX", "BONE AGE"),
    ("OT", None), (None, None), ("DX", ""),
])
def test_the_header_check_passes_hand_radiographs_and_empty_headers(tmp_path, modality, body_part):
    _, meta = read_image(make_dicom(tmp_path / "x.dcm", modality=modality, body_part=body_part))
    check_header(meta)
    _, png_meta = read_image(save_png(tmp_path / "x.png", hand_image()))
    check_header(png_meta)


def test_the_instance_uid_is_read_but_is_no_identifier_unless_asked(tmp_path):
    path = make_dicom(tmp_path / "x.dcm", modality="cr", body_part=" hand ")
    uid = pydicom.dcmread(path).SOPInstanceUID
    _, meta = read_image(path)
    assert (meta.modality, meta.body_part, meta.instance_uid) == ("CR", "HAND", uid)
    assert meta.identifiers == {} and uid not in repr(meta.notes)
    _, png_meta = read_image(save_png(tmp_path / "x.png", hand_image()))
    assert (png_meta.modality, png_meta.body_part, png_meta.instance_uid) == ("", "", "")


def test_a_file_that_cannot_be_opened_is_skipped_as_unreadable(tmp_path, monkeypatch):
    save_png(tmp_path / "ok.png", hand_image())
    save_png(tmp_path / "locked.png", hand_image())
    real_sniff = sources.sniff_kind

    def sniff(path):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied")
        return real_sniff(path)

    monkeypatch.setattr(sources, "sniff_kind", sniff)
    found = list(open_sources([tmp_path]))
    assert _split(found) == (["ok.png"], {"locked.png": SKIP_UNREADABLE})
    assert "Permission denied" in found[0].detail
