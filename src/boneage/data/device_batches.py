"""``data.loader=device``: a split's cached images on the training device, batched and augmented there.

``DeviceBatches`` copies the split's rows of the uint8 cache to the device ONCE, then yields the dicts
``BoneAgeDataset`` + ``DataLoader`` yield (image float [B, 1, S, S] normalised, male, target, months, row; the same
dtypes), already on the device. No worker, no per-image Python: the batch is gathered by index and augmented by
``boneage.augment_batch.BatchAugment``.

Order and sharding are those of the workers path (``boneage.training.runner.make_loaders``): a ``BatchSampler``
over the same sampler (``EpochShuffle`` for training: the same order on every process, a new one each epoch, the
uninterrupted run's order on resume), dealt to the processes by accelerate's own ``BatchSamplerShard`` as
``engine.prepare`` deals a DataLoader's batches (process i takes batches i, i + n, ...; the last round padded from
the start). ``engine.prepare`` passes anything that is not a DataLoader through untouched, so this object shards
itself; Catalyst reads ``batch_size``, ``batch_sampler`` (None: ``len(loader) x batch_size`` samples) and
``sampler`` from it. The augmentation's generator is seeded from torch's global RNG at the start of each pass,
which Catalyst seeds per epoch and process: reproducible, resumable, different on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from boneage.augment_batch import BatchAugment, normalise_tensor, progressive_size
from boneage.config import Config
from boneage.data.cache import PreparedCache


class DeviceBatches:
    """Batches of the cache rows ``indices`` on ``device``; ``sampler`` orders positions ``0..len(indices)-1``."""

    def __init__(self, cache: PreparedCache, indices: np.ndarray, *, target_mean: float, target_std: float,
                 task: str, batch_size: int, sampler: Sized, drop_last: bool, device: torch.device | str,
                 augment: BatchAugment | None = None, num_processes: int = 1, process_index: int = 0,
                 size_for_epoch: Callable[[int], int] | None = None) -> None:
        rows = np.array(indices, dtype=np.int64)  # a writable copy: torch shares its memory
        self.device = torch.device(device)
        months = cache.index["boneage"].to_numpy(dtype=np.float32)[rows]
        male = cache.index["male"].to_numpy(dtype=np.float32)[rows]
        # as BoneAgeDataset: the float32 month in float64 arithmetic, then float32
        target = male if task == "sex" else (months.astype(np.float64) - float(target_mean)) / float(target_std)
        self.images = torch.from_numpy(np.ascontiguousarray(cache.images[np.sort(rows)]))
        self.images = self.images[torch.from_numpy(np.argsort(np.argsort(rows)))].to(self.device)  # rows' order
        self.columns = {
            "male": torch.from_numpy(male).to(self.device),
            "target": torch.from_numpy(np.asarray(target, dtype=np.float32)).to(self.device),
            "months": torch.from_numpy(months).to(self.device),
            "row": torch.from_numpy(rows).to(self.device),
        }
        self.batch_size, self.sampler, self.drop_last = int(batch_size), sampler, bool(drop_last)
        self.batch_sampler = None  # Catalyst: the samples of a pass are len(self) x batch_size
        self.augment, self.size_for_epoch = augment, size_for_epoch
        self.num_processes, self.process_index = int(num_processes), int(process_index)

    def _batch_sampler(self) -> Any:
        batches = BatchSampler(self.sampler, self.batch_size, self.drop_last)  # type: ignore[arg-type]
        if self.num_processes == 1:  # accelerate wraps the batch sampler for several processes only
            return batches
        from accelerate.data_loader import BatchSamplerShard

        return BatchSamplerShard(batches, num_processes=self.num_processes, process_index=self.process_index)

    def __len__(self) -> int:
        return len(self._batch_sampler())

    def positions(self) -> list[list[int]]:
        """This process's batches of this pass, as positions into ``indices``."""
        return [list(b) for b in self._batch_sampler()]

    def out_size(self) -> int:
        """The image size of this pass (``size_for_epoch`` of the sampler's epoch, else the cached size)."""
        full = int(self.images.shape[-1])
        if self.size_for_epoch is None:
            return full
        return self.size_for_epoch(int(getattr(self.sampler, "epoch", 1)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self.positions()
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.int64).to(self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))  # torch's RNG: seeded by Catalyst
        size, start = self.out_size(), 0
        for batch in batches:
            pos = flat[start:start + len(batch)]
            start += len(batch)
            images = self.images[pos]
            image = (self.augment(images, generator, size) if self.augment is not None
                     else normalise_tensor(images))
            yield {"image": image, **{k: v[pos] for k, v in self.columns.items()}}


def make_device_loaders(cache: PreparedCache, train_idx: np.ndarray, val_idx: np.ndarray, cfg: Config,
                        sampler: Sized, target: dict[str, float], device: torch.device | str, *,
                        num_processes: int = 1, process_index: int = 0) -> dict[str, DeviceBatches]:
    """The device path's two loaders, with ``make_loaders``' batch sizes, orders and ``drop_last``: training
    augmented at ``augment.level`` (and ``augment.progressive_start``), validation normalised only."""
    t, a = cfg.train, cfg.augment
    common: dict[str, Any] = dict(target_mean=target["mean"], target_std=target["std"], task=cfg.model.task,
                                  device=device, num_processes=num_processes, process_index=process_index)
    full = cfg.preprocess.size
    grow = None if a.progressive_start is None else (
        lambda epoch: progressive_size(epoch, t.epochs, a.progressive_start, full))
    return {
        "train": DeviceBatches(cache, train_idx, batch_size=t.batch_size, sampler=sampler,
                               drop_last=len(train_idx) > t.batch_size, augment=BatchAugment(a.level, a.hflip),
                               size_for_epoch=grow, **common),
        "valid": DeviceBatches(cache, val_idx, batch_size=t.batch_size * 2,
                               sampler=SequentialSampler(range(len(val_idx))), drop_last=False, **common),
    }
