"""Torch dataset over a prepared cache: no file is decoded during an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from boneage.data.cache import PreparedCache
from boneage.transforms import to_tensor


class BoneAgeDataset(Dataset):
    """Rows ``indices`` of a cache as dicts: image [1,S,S], male, target (normalised), months, row."""

    def __init__(
        self,
        cache: PreparedCache,
        indices: np.ndarray,
        transform: A.Compose,
        target_mean: float,
        target_std: float,
        task: str = "age",
    ) -> None:
        self.images = cache.images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.months = cache.index["boneage"].to_numpy(dtype=np.float32)
        self.male = cache.index["male"].to_numpy(dtype=np.float32)
        self.transform = transform
        self.mean, self.std = float(target_mean), float(target_std)
        self.task = task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[i])
        # Albumentations keeps its own RNG: seed it from torch's, which Catalyst seeds per epoch and
        # DataLoader per worker, so augmentation is reproducible (and resumable) and differs across workers.
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        image = to_tensor(np.asarray(self.images[row]), self.transform)
        months = float(self.months[row])
        male = float(self.male[row])
        target = male if self.task == "sex" else (months - self.mean) / self.std
        return {
            "image": image,
            "male": torch.tensor(male, dtype=torch.float32),
            "target": torch.tensor(target, dtype=torch.float32),
            "months": torch.tensor(months, dtype=torch.float32),
            "row": torch.tensor(row, dtype=torch.int64),
        }


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A shuffled order of ``range(n)`` that depends on ``(seed, epoch)`` alone.

    Every data-parallel process draws the very same order, so the engine's dealing of batches to processes gives
    disjoint shards (a plain ``shuffle=True`` draws from each process's own RNG, which Catalyst seeds per rank, and
    the shards overlap); ``use_epoch`` (``EpochShuffleCallback``) gives each epoch a new order, and a resumed run
    the order the uninterrupted run had.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def use_epoch(self, epoch: int) -> None:
        """Not ``set_epoch``: accelerate calls a sampler's ``set_epoch`` with its own pass counter, which starts
        at 0 again in a resumed run; ``EpochShuffleCallback`` passes Catalyst's epoch, which resumes."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())
