"""Label files, splits, synthetic phantoms and the RSNA download (no torch imports here)."""

from boneage.data.download import download_rsna
from boneage.data.rsna import read_labels, write_labels
from boneage.data.splits import kfold_split, train_val_split
from boneage.data.synth import make_synth_dataset, render_phantom

__all__ = [
    "download_rsna",
    "kfold_split",
    "make_synth_dataset",
    "read_labels",
    "render_phantom",
    "train_val_split",
    "write_labels",
]
