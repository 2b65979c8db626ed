#!/usr/bin/env bash
# One call on a GPU machine (see benchmarks/gpu_check.py): CUDA-only tests, a width-512 teacher, a DSA set, the
# validation study and issue #9's cross-architecture tables, within --budget seconds (default 520).
#   bash benchmarks/gpu_check.sh --data PATH/cifar10-jpeg.tar.gz [--budget 470]
#   bash benchmarks/gpu_check.sh --device cpu --tiny --data TOY_FOLDER --work /tmp/w --results /tmp/r   # CPU path
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
