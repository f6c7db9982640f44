"""Regenerate ``tests/data/golden_*``: records and pictures of a fixed set, made by the code of commit 5495086 (before
the analysis pipeline of issue 27), which ``tests/test_pipeline_golden.py`` compares the current code with.

    python tests/make_golden.py   # from the repository root, with the [all] install
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dicom_fixtures import hand_pixels, make_dicom  # noqa: E402
from helpers_predict import make_checkpoint, save_png  # noqa: E402

GOLDEN = HERE / "data"


def golden_inputs(folder: Path) -> list[tuple[Path, dict]]:
    """The fixed set: (file, request) pairs: 8- and 16-bit PNGs, sex known and unknown, a DICOM with its header."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (h, w, bits) in enumerate(((300, 240, 8), (400, 320, 8), (256, 256, 12))):
        pixels = hand_pixels(h, w, bits=bits, seed=10 + i)
        if bits > 8:
            pixels = (pixels.astype(np.uint32) * 16).astype(np.uint16)
        path = save_png(folder / f"hand{i}.png", pixels)
        cases.append((path, {"sex": ("F", None, "M")[i], "chronological_age": ("9y", None, "150m")[i]}))
    cases.append((make_dicom(folder / "scan.dcm", hand_pixels(320, 260, bits=12, seed=20)), {}))
    return cases


def checkpoints(folder: Path) -> list[Path]:
    return [make_checkpoint(folder / "a.pt"), make_checkpoint(folder / "b.pt", seed=1, mae=10.5, crop_hand=True)]


def main() -> None:
    import tempfile

    from boneage.inference.batch import load_predictor
    from boneage.io import read_image
    from boneage.inference.analysis import predict_array

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictor = load_predictor(checkpoints(tmp), tta=True, device="cpu")
        records, pictures = [], {}
        for path, request in golden_inputs(tmp / "in"):
            image, meta = read_image(path)
            analysis = predict_array(predictor, image, meta, heatmap=True, **request)
            record = dict(analysis.record, file=path.name)
            records.append(record)
            record["radiograph_sha256"] = hashlib.sha256(analysis.radiograph.tobytes()).hexdigest()
            pictures[path.stem] = analysis.heatmap
        (GOLDEN / "golden_records.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        np.savez_compressed(GOLDEN / "golden_heatmaps.npz", **pictures)


if __name__ == "__main__":
    main()
