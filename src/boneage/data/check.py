"""The one dataset layout (``DIR/images/<id>.png`` + ``DIR/labels.csv``): checked before training, found by the
notebook, and the flags of ``boneage download`` and ``boneage check-data``.

``boneage check-data`` is the pre-flight step of the platform training job (``make training``): it runs in its
own job that never restarts, so a missing or invalid dataset (or, with ``--gpu``, an unusable GPU) fails once
instead of looping under the training job's ``on-failure`` restart policy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from boneage.cli_types import out_folder
from boneage.errors import DataError

IMAGES = "images"
LABELS = "labels.csv"


def check_dataset(images: str | Path, labels: str | Path) -> dict[str, Any]:
    """Images folder and labels CSV present, every row valid and its image there; a summary, else ``DataError``
    naming what is missing or wrong."""
    from boneage.data.rsna import read_labels

    images, labels = Path(images), Path(labels)
    missing = [f"the images folder {images}/" for _ in [0] if not images.is_dir()]
    missing += [f"the labels file {labels}" for _ in [0] if not labels.is_file()]
    if missing:
        raise DataError(f"no dataset: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. "
                        "Put the data there first (make download-data, or make upload-data DATA_DIR=...)")
    df = read_labels(labels, images)
    if df.empty:
        raise DataError(f"{labels}: no labelled rows")
    return {"images": str(images), "labels": str(labels), "n": int(len(df)), "boys": int(df["male"].sum()),
            "boneage_months": [float(df["boneage"].min()), float(df["boneage"].max())]}


def find_notebook_data(data_dir: str, repo: Path | None) -> tuple[Path | None, str]:
    """The demo notebook's data choice: (folder with images/ + labels.csv, or None for phantoms; what it says).

    ``data_dir``: ``synth``/``phantoms`` = phantoms on purpose; a folder = that dataset (an absent or empty
    folder, e.g. a platform data volume nothing was uploaded to yet, means phantoms, said loudly; a folder with
    something else in it is an error); empty = the RSNA sample beside the repository or ``data/``, else phantoms.
    """
    def is_dataset(folder: Path) -> bool:
        return (folder / LABELS).is_file() and (folder / IMAGES).is_dir()

    loud = ("*** NO REAL DATA: {why}; drawing SYNTHETIC PHANTOMS instead -- every number below is about "
            "phantoms, nothing about real radiographs ***")
    if data_dir.lower() in ("synth", "phantoms"):
        return None, f"data: synthetic phantoms (DATA_DIR={data_dir})"
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_absolute() and repo is not None:
            folder = repo / folder
        if is_dataset(folder):
            return folder, f"data: real radiographs in {folder} (DATA_DIR)"
        if not folder.is_dir() or not any(p.name != ".gitkeep" for p in folder.iterdir()):
            return None, loud.format(why=f"DATA_DIR={folder} is {'empty' if folder.is_dir() else 'absent'}")
        raise FileNotFoundError(f"DATA_DIR={folder} needs {IMAGES}/ and {LABELS} inside (make download-data or "
                                "make upload-data puts them there); or set DATA_DIR = 'synth' for phantoms")
    candidates = [repo.parent / "shared" / "data" / "rsna-bone-age", repo / "data"] if repo else []
    found = next((c for c in candidates if is_dataset(c)), None)
    if found is not None:
        return found, f"data: real radiographs in {found}"
    looked = ", ".join(str(c) for c in candidates) or "nothing (no repository found; set BONEAGE_DATA_DIR)"
    return None, loud.format(why=f"no DATA_DIR and no dataset in {looked}")


def cmd_check_data(args: argparse.Namespace) -> int:
    s = check_dataset(args.images, args.labels)
    lo, hi = s["boneage_months"]
    print(f"data OK: {s['n']} labelled images ({s['boys']} boys), bone age {lo:.0f}-{hi:.0f} months; "
          f"labels {s['labels']}, images {s['images']}/")
    if args.gpu:
        import torch

        from boneage.training.runner import require_usable_gpu

        require_usable_gpu(torch.cuda.is_available())
        print(f"GPU OK: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from boneage.data.download import download_rsna

    download_rsna(args.out)
    return 0


def add_arguments(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Registers ``boneage download`` and ``boneage check-data`` with the CLI's ``command`` factory."""
    p = command("download", "fetch the RSNA training set from Kaggle into DIR/images/ + DIR/labels.csv "
                "(needs an API token)")
    p.add_argument("--out", default="data/rsna-bone-age", type=out_folder, metavar="DIR",
                   help=f"where to put {IMAGES}/ and {LABELS} (the layout boneage train, make training and the "
                        "notebook read)")
    p.set_defaults(func=cmd_download)
    p = command("check-data", "check a dataset before training: images folder, labels file, every row valid")
    p.add_argument("--images", default=f"data/{IMAGES}", metavar="DIR", help="images folder (<id>.png)")
    p.add_argument("--labels", default=f"data/{LABELS}", metavar="CSV", help="labels CSV (id,boneage,male)")
    p.add_argument("--gpu", action="store_true",
                   help="also check that a CUDA GPU is visible and runs a kernel (as train.engine=gpu requires)")
    p.set_defaults(func=cmd_check_data)
