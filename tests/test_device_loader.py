"""``data.loader=device``: the batches ``boneage.data.device_batches`` yields are the workers path's (same rows,
order, batch counts, DDP shards, exact validation images), and a tiny run trains end to end with them."""

import json

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from catalyst import dl
from torch.utils.data import BatchSampler

from boneage.config import load_config
from boneage.data.cache import prepare_cache
from boneage.data.dataset import BoneAgeDataset, EpochShuffle
from boneage.data.device_batches import DeviceBatches, make_device_loaders
from boneage.data.rsna import read_labels
from boneage.data.synth import make_synth_dataset
from boneage.training.runner import make_loaders, train
from boneage.transforms import build_transforms

TINY = ["preprocess.size=64", "model.width=0.5", "train.batch_size=8", "data.val_fraction=0.25",
        "augment.level=light", "train.num_threads=2"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_synth_dataset(tmp_path_factory.mktemp("phantoms"), 40, seed=4)


@pytest.fixture(scope="module")
def cache(phantoms, tmp_path_factory):
    cfg = load_config("bonenet-s", TINY)
    df = read_labels(phantoms / "labels.csv", phantoms / "images")
    return prepare_cache(df, cfg.preprocess, tmp_path_factory.mktemp("cache"), workers=1, progress=False)


def _both(cache, n_train: int, batch: int, *extra: str):
    """The workers loaders and the device loaders for the same split and config."""
    cfg = load_config("bonenet-s", [*TINY, f"train.batch_size={batch}", *extra])
    rows = np.random.default_rng(0).permutation(len(cache.index))
    train_idx, val_idx = rows[:n_train], rows[n_train:]
    target = {"mean": 100.0, "std": 30.0}
    sampler = EpochShuffle(len(train_idx), cfg.train.seed)
    datasets = [BoneAgeDataset(cache, idx, build_transforms(cfg.augment, phase), target["mean"], target["std"])
                for idx, phase in ((train_idx, "train"), (val_idx, "eval"))]
    workers = make_loaders(*datasets, cfg, sampler)
    device = make_device_loaders(cache, train_idx, val_idx, cfg, sampler, target, "cpu")
    return workers, device, sampler


def test_validation_batches_equal_the_workers_path(cache):
    workers, device, _ = _both(cache, 28, 4)
    ours, theirs = list(device["valid"]), list(workers["valid"])
    assert len(ours) == len(theirs) == len(device["valid"]) == 2  # 12 images, batches of 8
    for a, b in zip(ours, theirs):
        assert set(a) == set(b) == {"image", "male", "target", "months", "row"}
        for key in b:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a["image"], b["image"])  # the exact normalisation, bit for bit
        for key in ("male", "months", "row", "target"):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("n_train, batch", [(28, 8), (24, 8), (5, 8), (8, 8)])
def test_training_order_and_batch_count_are_the_workers_paths(cache, n_train, batch):
    workers, device, sampler = _both(cache, n_train, batch)
    assert len(device["train"]) == len(workers["train"])  # drop_last as the DataLoader's
    for epoch in (1, 2):
        sampler.use_epoch(epoch)
        ours = [b["row"].tolist() for b in device["train"]]
        theirs = [b["row"].tolist() for b in workers["train"]]
        assert ours == theirs, epoch  # EpochShuffle's order of the same rows
        images = [b["image"] for b in device["train"]]
        assert all(i.shape[1:] == (1, 64, 64) and i.dtype == torch.float32 for i in images)
        assert len(ours) == len(workers["train"])
    sampler.use_epoch(1)
    first = [b["row"].tolist() for b in device["train"]]
    sampler.use_epoch(2)
    assert first != [b["row"].tolist() for b in device["train"]] or n_train <= batch  # a new order each epoch


@pytest.mark.parametrize("n_train, batch", [(28, 4), (27, 4), (5, 4)])
def test_ddp_shards_are_accelerates_dealing(cache, n_train, batch):
    """Each process takes the batches accelerate's ``prepare`` would deal it from the DataLoader: disjoint
    (up to its padding of the last round), new every epoch."""
    dl.CPUEngine()  # accelerate's dealing needs an initialised state, as in a run
    for key in ("train", "valid"):
        for epoch in (1, 3):
            shards = []
            for rank in (0, 1):
                workers, device, sampler = _both(cache, n_train, batch)
                sampler.use_epoch(epoch)
                single = device[key]
                ours = DeviceBatches(cache, single.columns["row"].numpy(), target_mean=0, target_std=1, task="age",
                                     batch_size=single.batch_size, sampler=single.sampler,
                                     drop_last=single.drop_last, device="cpu", num_processes=2, process_index=rank)
                dealt = prepare_data_loader(workers[key], num_processes=2, process_index=rank)
                assert ours.positions() == [list(b) for b in dealt.batch_sampler] and len(ours) == len(dealt)
                if len(dealt):  # (accelerate's loader yields a None for a shard of no batch)
                    assert [b["row"].tolist() for b in ours] == [b["row"].tolist() for b in dealt]
                shards.append(ours.positions())
            flat = [i for s in shards for b in s for i in b]
            if key == "train":
                assert len(flat) == len(set(flat))  # disjoint


def test_batch_sampler_contract_for_catalyst(cache):
    _, device, sampler = _both(cache, 28, 8)
    loader = device["train"]
    assert loader.batch_size == 8 and loader.batch_sampler is None and loader.sampler is sampler
    assert loader.positions() == [list(b) for b in BatchSampler(sampler, 8, True)]
    assert loader.images.device.type == "cpu" and loader.images.dtype == torch.uint8


def test_a_tiny_run_trains_with_the_device_loader(phantoms, tmp_path):
    cfg = load_config("bonenet-s", [*TINY, f"data.images={phantoms / 'images'}",
                                    f"data.labels={phantoms / 'labels.csv'}", f"data.cache_dir={tmp_path / 'cache'}",
                                    "data.loader=device", "train.epochs=2", "augment.level=strong",
                                    "augment.progressive_start=48", "train.channels_last=true"])
    metrics = train(cfg, tmp_path / "run", workers=1)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epochs_done"] == 2 and np.isfinite(saved["best"]["mae_months"])
    assert saved["best"]["n"] == metrics["target"]["n_valid"]  # the whole validation split
