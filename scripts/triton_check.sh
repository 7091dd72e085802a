#!/usr/bin/env bash
# Run mamba-ssm's Triton SSD kernel on the CPU, under Triton's interpreter, and check it against the package's own
# SSD (tests/test_triton.py). No GPU and no CUDA toolkit needed. From the repository root:
#     bash scripts/triton_check.sh            # any further arguments go to pytest
# The first run builds .venv-triton (about 2.4 GB; mamba-ssm is built from source without its CUDA extension);
# later runs reuse it. Delete .venv-triton to start again.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-triton
# The versions that work together under the interpreter (torch's CPU build; the triton its CUDA build pins).
pins="torch==2.13.0 triton==3.7.1 mamba-ssm==2.3.2.post1"
stamp="$venv/.tim4rec-triton-ready"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q packaging ninja wheel setuptools einops
  # mamba-ssm's setup.py imports torch (hence no build isolation); without nvcc it must skip its CUDA extension and
  # must not try to fetch a prebuilt CUDA wheel.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$venv/bin/pip" install -q --no-build-isolation \
    -e ".[gpu,dev]" torch==2.13.0 triton==3.7.1 mamba-ssm==2.3.2.post1
  echo "$pins" > "$stamp"
fi

# Triton reads TRITON_INTERPRET when a kernel is defined, and Lightning imports Triton at startup: set it here, before
# Python starts. Everything else the interpreter needs is set up by tests/test_triton.py itself.
export TRITON_INTERPRET=1 MAMBA_DETERMINISTIC=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE=offline WANDB_SILENT=true
exec "$venv/bin/python" -m pytest -p no:cacheprovider -m triton_interpret -rs tests/test_triton.py "$@"
