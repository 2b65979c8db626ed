#!/usr/bin/env bash
# One call on a GPU machine (see benchmarks/gpu_check.py), within --budget seconds (default 540). The default plan
# (--stages speed,cuda_tests,table5): issue #12's batched-seeds speed section alone on the device; then, with the
# CUDA-only tests in the background, one Table 5 row block (benchmarks/gpu_table5_study.toml: bundled DM set, six
# models, baseline and official ELF, 5 batched seeds, 1000 epochs, full test set -> results/gpu-table5/), one process
# per cell. Adding the stage followups runs issue #9's table on one machine beside it (gpu_chosen_table_study.toml ->
# results/gpu-chosen-table/; the other follow-up studies with --followups NAMES or --followups all).
# Finished runs are skipped, so a second call continues.
# The first call's stages (teacher, distill, val, tables) stay selectable with --stages.
# On a lent device machine (no ../shared; only files directly under $OUT come back): carry a copy of the data in
# .gpudata/ (git-ignored) and the script writes $OUT/gpu-results.tgz (--archive) with what this call wrote:
#   mkdir -p .gpudata && cp ../shared/data/cifar10-jpeg.tar.gz .gpudata/      # here, once
#   bash benchmarks/gpu_check.sh --data .gpudata/cifar10-jpeg.tar.gz           # device: carry [".gpudata"], 600 s
#   tar xzf gpu-results.tgz -C .                                               # here, from the returned files
#   bash benchmarks/gpu_check.sh --data PATH/cifar10-jpeg.tar.gz [--budget 540]
#   bash benchmarks/gpu_check.sh --data PATH --stages teacher,distill,val,tables --budget 470   # the first call
#   bash benchmarks/gpu_check.sh --device cpu --tiny --data TOY_FOLDER --work /tmp/w --results /tmp/r   # CPU path
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
