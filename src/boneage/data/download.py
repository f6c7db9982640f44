"""Download the RSNA Pediatric Bone Age training set (Kaggle copy ``kmader/rsna-bone-age``) into the one
layout every reader expects: ``DIR/images/<id>.png`` + ``DIR/labels.csv`` (``id,boneage,male``).

Uses the official ``kaggle`` client (``pip install 'boneage[download]'``) and your Kaggle API
credentials. The data are under the RSNA terms: non-commercial research and education only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from boneage.errors import BoneAgeError, DataError

KAGGLE_DATASET = "kmader/rsna-bone-age"
TRAIN_CSV = "boneage-training-dataset.csv"
TRAIN_IMAGES = "boneage-training-dataset"
RSNA_TERMS = (
    "RSNA terms: use the data only for non-commercial research and education, make no attempt to "
    "identify anyone, and cite Halabi SS et al., 'The RSNA Pediatric Bone Age Machine Learning "
    "Challenge', Radiology 2019;290(2):498-503."
)
_HOW_TO = (
    "To download: (1) pip install 'boneage[download]'; (2) on kaggle.com go to Account (Settings) -> API -> "
    "Create New Token; (3) save the downloaded kaggle.json as ~/.kaggle/kaggle.json and run "
    "chmod 600 ~/.kaggle/kaggle.json (or set KAGGLE_USERNAME and KAGGLE_KEY); (4) open "
    f"https://www.kaggle.com/datasets/{KAGGLE_DATASET} and accept its terms; (5) rerun "
    "`boneage download --out DIR`. "
)


def _config_dirs() -> list[Path]:
    """Folders the kaggle client reads credentials from (KAGGLE_CONFIG_DIR, ~/.kaggle, XDG)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    home = Path.home()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return [home / ".kaggle", xdg / "kaggle"]


def kaggle_credentials() -> str | None:
    """Where Kaggle credentials were found (a description), or None when there are none."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY environment variables"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN environment variable"
    for folder in _config_dirs():
        for name in ("kaggle.json", "access_token"):
            if (folder / name).is_file():
                return str(folder / name)
    return None


def find_kaggle_layout(dest_dir: str | Path) -> tuple[Path, Path]:
    """(labels CSV, image folder) of a downloaded Kaggle copy; the images may sit one folder deeper."""
    dest = Path(dest_dir)
    labels = dest / TRAIN_CSV
    images = dest / TRAIN_IMAGES
    if (images / TRAIN_IMAGES).is_dir():
        images = images / TRAIN_IMAGES
    if not labels.is_file() or not images.is_dir():
        raise DataError(
            f"{dest}: no {TRAIN_CSV} and {TRAIN_IMAGES}/ folder here; the download is incomplete or "
            f"not the Kaggle copy {KAGGLE_DATASET}: delete the folder and rerun `boneage download --out {dest}`"
        )
    return labels, images


def arrange_layout(dest_dir: str | Path) -> tuple[Path, Path]:
    """Move a Kaggle copy's training set into ``images/`` + ``labels.csv`` (same CSV, same files, moved);
    returns (labels, images). Already arranged: nothing to do."""
    dest = Path(dest_dir)
    labels, images = dest / "labels.csv", dest / "images"
    if labels.is_file() and images.is_dir():
        return labels, images
    kaggle_labels, kaggle_images = find_kaggle_layout(dest)
    if images.exists():
        raise DataError(f"{images} exists but {labels} does not: move it away and rerun")
    kaggle_images.rename(images)
    outer = dest / TRAIN_IMAGES
    if outer.is_dir() and not any(outer.iterdir()):
        outer.rmdir()
    shutil.move(str(kaggle_labels), str(labels))
    return labels, images


def download_rsna(dest_dir: str | Path) -> Path:
    """Download and unzip ``kmader/rsna-bone-age`` into ``dest_dir``, then arrange its training set as
    ``dest_dir/images/`` + ``dest_dir/labels.csv``; print and return ``dest_dir``.

    A ``dest_dir`` that already holds ``images/`` and ``labels.csv`` is left as it is (nothing downloaded).
    Raises ``BoneAgeError`` with the steps to follow when the client or credentials are missing.
    """
    dest = Path(dest_dir)
    if (dest / "labels.csv").is_file() and (dest / "images").is_dir():
        print(f"{dest} already holds images/ and labels.csv: nothing to download (delete them to fetch again)")
        return dest
    if importlib.util.find_spec("kaggle") is None:
        raise BoneAgeError(f"the kaggle package is not installed. {_HOW_TO}{RSNA_TERMS}")
    if kaggle_credentials() is None:
        looked = ", ".join(str(d / "kaggle.json") for d in _config_dirs())
        raise BoneAgeError(f"no Kaggle API credentials found (looked in {looked} and the KAGGLE_USERNAME/"
                           f"KAGGLE_KEY environment variables). {_HOW_TO}{RSNA_TERMS}")
    print(RSNA_TERMS)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        import kaggle  # authenticates on import

        kaggle.api.dataset_download_files(KAGGLE_DATASET, path=str(dest), unzip=True, quiet=False)
    except (Exception, SystemExit) as exc:  # the client exits or raises many kinds on auth/network errors
        raise BoneAgeError(
            f"downloading {KAGGLE_DATASET} into {dest} failed ({type(exc).__name__}: {exc}); check your "
            f"network and credentials, and that you accepted the dataset's terms on "
            f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}. {_HOW_TO}"
        ) from exc
    labels, images = arrange_layout(dest)
    print(f"labels: {labels}\nimages: {images}\ntrain with: boneage train --config CONFIG "
          f"--images {images} --labels {labels} --out runs/NAME")
    return dest
