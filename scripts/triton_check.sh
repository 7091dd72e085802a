#!/usr/bin/env bash
# Run mamba-ssm's Triton SSD kernel on the CPU, under Triton's interpreter, through the exact call the CUDA path
# makes, and check it against the package's own SSD (tests/test_triton.py). No GPU or CUDA toolkit needed.
# From the repository root:
#     bash scripts/triton_check.sh            # any further arguments go to pytest
# The first run builds .venv-triton (about 3 GB): torch's CPU build with the triton and mamba-ssm versions of the GPU
# image (docker/constraints-gpu.txt), mamba-ssm built from source without its CUDA extension. Later runs reuse it;
# delete .venv-triton to start again.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-triton
constraints=docker/constraints-gpu.txt
stamp="$venv/.constraints-installed"

if ! cmp -s "$constraints" "$stamp"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c "$constraints" torch
  "$venv/bin/pip" install -q packaging ninja wheel setuptools einops
  # mamba-ssm's setup.py imports torch (hence no build isolation); without nvcc it must skip its CUDA extension and
  # must not look for a prebuilt CUDA wheel.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$venv/bin/pip" install -q --no-build-isolation \
    -c "$constraints" -e ".[gpu,dev]"
  cp "$constraints" "$stamp"
fi

# Triton chooses between compiling and interpreting when a kernel is defined, and Lightning imports Triton at start-up:
# the variable must be set before Python starts. The rest of the interpreter's set-up is in tests/test_triton.py.
export TRITON_INTERPRET=1 MAMBA_DETERMINISTIC=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE=offline WANDB_SILENT=true
exec "$venv/bin/python" -m pytest -p no:cacheprovider -m triton_interpret -rs tests/test_triton.py "$@"
