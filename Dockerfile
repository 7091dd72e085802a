# tim4rec-pl on a CUDA machine, with mamba-ssm's fused SSD kernel:
#   docker build -t tim4rec-pl .
#   docker run --gpus all --ipc=host -e WANDB_API_KEY -v $PWD/data:/work/data -v $PWD/runs:/work/runs \
#       tim4rec-pl fit --config configs/ml-1m.yaml
# Versions: docker/constraints-gpu.txt (torch, triton, mamba-ssm), checked with scripts/check_gpu_constraints.sh.
# Base: NVIDIA's CUDA *devel* image (nvcc included): torch's wheel brings its own CUDA 13.0 libraries, and nvcc of the
# same major version compiles mamba-ssm's CUDA extension when no prebuilt wheel matches (about 10-30 minutes).
# Ubuntu 24.04: Python 3.12.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 WANDB_DIR=/work/runs \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/tim4rec-pl
# torch first (its own layer: the largest download), at the pinned version; pytest for benchmarks/gpu_check.py.
COPY docker/constraints-gpu.txt ./docker/constraints-gpu.txt
RUN pip install -c docker/constraints-gpu.txt torch triton packaging ninja wheel setuptools einops pytest
COPY pyproject.toml README.md ./
COPY tim4rec_pl ./tim4rec_pl
# mamba-ssm's setup.py imports torch, hence --no-build-isolation. MAX_JOBS bounds the compiler's parallel jobs (memory).
ARG MAX_JOBS=4
RUN MAX_JOBS=$MAX_JOBS pip install --no-build-isolation -c docker/constraints-gpu.txt ".[gpu]" \
 && python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'triton', 'mamba-ssm')), sep=', ')"

# Run as an unprivileged user (uid 1000, which Ubuntu's image gives to `ubuntu`); data sets and runs live in volumes.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 tim4rec \
 && mkdir -p /work/data /work/runs && chown -R tim4rec /work
COPY --chown=tim4rec configs /work/configs
USER tim4rec
WORKDIR /work
VOLUME ["/work/data", "/work/runs"]

ENTRYPOINT ["tim4rec-pl"]
CMD ["--help"]
