#!/usr/bin/env bash
# The GPU recipe's one device command and its carry list (benchmarks/gpu_recipe; docs/benchmarks.md).
#
# First, here:  make gpu-recipe-pack   (writes .gpu/: the WebP pack, the fp16 weights, the wheels; git-ignored)
# Then paste COMMAND as the device tool's command, CARRY as its carry, with timeout_s 600. On the GPU machine it
# installs the wheels into /tmp/site (first on PYTHONPATH, so Catalyst's accelerate < 0.28 shadows the image's),
# runs the recipe under `timeout` (the run's own budget is 8.5 minutes) and tees the log into $OUT, beside
# gpu_recipe.json and gpu_recipe_logs.tar.gz. Afterwards, here: python -m benchmarks.gpu_recipe render
# <files_at>/gpu_recipe.json
#
#   bash benchmarks/gpu_recipe/device.sh            both, labelled
#   bash benchmarks/gpu_recipe/device.sh --command  the command alone
#   bash benchmarks/gpu_recipe/device.sh --carry    the carry list alone (JSON)
set -euo pipefail

CARRY='[".gpu"]'
COMMAND='set -o pipefail; nvidia-smi -L; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 3; export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1; timeout -k 10 570 python3 -m benchmarks.gpu_recipe run --pack .gpu --out $OUT --work /tmp/gpu_recipe 2>&1 | tee $OUT/gpu_recipe.log'

case "${1:-}" in
  --command) printf '%s\n' "$COMMAND" ;;
  --carry) printf '%s\n' "$CARRY" ;;
  "") printf 'command (%d characters):\n%s\n\ncarry:\n%s\n' "${#COMMAND}" "$COMMAND" "$CARRY" ;;
  *) echo "usage: $0 [--command | --carry]" >&2; exit 2 ;;
esac
