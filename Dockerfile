# tim4rec-pl on a CUDA machine: `docker build -t tim4rec-pl .`
#   docker run --gpus all -v $PWD/data:/work/data -v $PWD/runs:/work/runs tim4rec-pl fit --config configs/ml-1m.yaml
# Base: PyTorch's CUDA runtime image (Python 3.11, torch 2.4.1, CUDA 12.4). mamba-ssm's setup.py fetches the prebuilt
# wheel matching this torch/CUDA/Python, so no compiler is needed; it imports torch while building, hence
# --no-build-isolation (with its build needs installed first).
FROM pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 WANDB_DIR=/work/runs

WORKDIR /opt/tim4rec-pl
COPY pyproject.toml README.md ./
COPY tim4rec_pl ./tim4rec_pl
RUN pip install packaging ninja wheel setuptools \
 && pip install --no-build-isolation ".[gpu]"

# Run as an unprivileged user; data sets and runs live in volumes.
RUN useradd --create-home --uid 1000 tim4rec \
 && mkdir -p /work/data /work/runs && chown -R tim4rec /work
COPY --chown=tim4rec configs /work/configs
USER tim4rec
WORKDIR /work
VOLUME ["/work/data", "/work/runs"]

ENTRYPOINT ["tim4rec-pl"]
CMD ["--help"]
