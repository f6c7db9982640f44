"""The GPU recipe: one prepared device command that trains and measures everything GPU, rehearsed on the CPU.

A GPU machine is lent rarely and briefly (15 minutes of device time, start included; one bash command of at most
2,000 characters and 10 minutes; a working tree of at most 64 MiB; no network). So everything is prepared here:

1. ``pack`` (here, on the CPU): the shared RSNA sample preprocessed once per preprocessing of the GPU configs (the
   one ``boneage.preprocess`` path, through ``prepare_cache``), stored as WebP at the highest quality that fits the
   byte budget left by the rest of the tree, with the labels and the standard split; the backbones' ImageNet
   weights in fp16; the wheels of the training packages the GPU machine lacks. All in ``.gpu/`` (git-ignored: it
   is derived from the radiographs), which the device call carries.
2. ``run`` (on the GPU): decodes the pack into a labelled folder and seeds the preprocessing cache with the decoded
   images, so ``boneage train`` and ``boneage evaluate`` run unchanged (they find the cache and reuse it), then
   trains every config with the real runner, evaluates with and without TTA, scores the extra ``--eval`` sets,
   times batched ``boneage predict`` in fp32 and fp16, checks fp16-vs-fp32 parity and Grad-CAM, and writes one
   results JSON after every stage. Training sees WebP-decoded images.
3. ``device.sh`` prints the one-line device command and the carry list; ``render`` turns a results JSON into
   ``benchmarks/results/gpu_recipe.json``, docs/benchmarks.md and the README's table.

``tests/test_gpu_recipe.py`` rehearses pack -> run on the CPU with phantoms at 64 px, through the same functions.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = ("lite0-gpu-299", "lite2-gpu-299")  # trained in this order
VAL_FRACTION = 0.15  # the standard split of every measured result here
SPLIT_SEED = 2017
TRAVEL_LIMIT_MIB = 60.0  # the device tool's limit is 64 MiB for the whole tree: keep a margin
PACK_DIR = ".gpu"  # git-ignored, carried by the device call
RESULTS_NAME = "gpu_recipe.json"
REPO = Path(__file__).resolve().parents[2]
DEVICE_SCRIPT = Path(__file__).resolve().parent / "device.sh"
